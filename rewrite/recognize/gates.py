"""The model's own output gate, ``o_proj(attn ⊙ act(W_g x))``, read into an ``OutputGate``.

1. The gate operand of the ``mul`` walks back to a projection of the site's input x (its own ``gate_proj``, or
   rows of a fused ``q_proj`` as in Qwen3-Next).
2. Tagged index tensors (``layout``) pair each gated element with a gate row: attention column (head i,
   feature j) ↔ row R[i, j]; rows equal along j make a per-head gate.
3. The ops between that projection and the ``mul`` must be elementwise (sigmoid, softplus, casts, scalar
   scaling) or rearrangements; the elementwise ones are replayed on (B, Hq, S, dg) as the gate's ``act``.
Refused: a gate of another input, a gate scaled by a stored tensor (its own per-feature vector), any other op.
"""
from __future__ import annotations

import torch
from torch import fx

from ..output_gate import OutputGate
from .common import INDEX_OPS, _Skip, op_name
from .layout import _propagate
from .projections import _path, _walk_back_to_projection

ELEMENTWISE = {"sigmoid", "softplus", "silu", "tanh", "exp", "relu", "gelu", "neg", "_to_copy", "to", "type_as",
               "mul", "div", "add", "sub", "clone", "contiguous", "alias", "detach"}


def _scalar(a, env):
    """A Python number for a scalar argument, or None for a tensor of more than one element."""
    if not isinstance(a, fx.Node):
        return a
    v = env.get(a)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, (int, float)):
        return v
    return None


def _act(path: list, proj: fx.Node, gate: fx.Node, env: dict) -> tuple:
    """The elementwise ops from ``proj`` to ``gate`` as an fx graph on (B, Hq, S, dg), and their names."""
    g = fx.Graph()
    cv = {proj: g.placeholder("y")}
    names = []
    for n in path:
        name = op_name(n)
        chain = [a for a in n.all_input_nodes if a in cv]
        if name in INDEX_OPS and len(chain) == 1:
            cv[n] = cv[chain[0]]  # rows were read by the tags; an elementwise map commutes with moving them
            continue
        if name not in ELEMENTWISE or len(chain) != 1:
            raise _Skip(f"the output gate applies '{name}', which is not elementwise")
        if name == "type_as":
            cv[n] = g.call_method("to", (cv[chain[0]], env[n].dtype))
        else:
            def arg(a):
                if a in cv:
                    return cv[a]
                s = _scalar(a, env)
                if s is None:
                    raise _Skip(f"the output gate's '{name}' uses the tensor '{a.name}' (a stored per-feature "
                                "scale); only scalars can follow the gate's heads")
                return s
            cv[n] = g.create_node(n.op, n.target, fx.map_arg(n.args, arg), fx.map_arg(n.kwargs, arg))
        names.append(name)
    g.output(cv[gate])
    return fx.GraphModule(torch.nn.Module(), g), names


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    """``target`` is upstream of ``node`` (or is it)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def read_gate(gm, mul: fx.Node, ours: fx.Node, att_tag: torch.Tensor, x: fx.Node, env: dict, hq: int, dv: int,
              x_of, core: tuple) -> OutputGate:
    """The gate of ``mul`` (one operand, ``ours``, carries the attention output with tags ``att_tag``); ``core``:
    the core's output, q and k nodes, which a gate of the input never reads."""
    other = mul.args[1] if mul.args[0] is ours else mul.args[0]
    if not isinstance(other, fx.Node):
        raise _Skip("the attention output is scaled by a constant before the output projection")
    if any(_depends_on(other, n) for n in core):
        raise _Skip(f"the attention output is scaled by '{other.name}', a function of the attention itself "
                    "(such as sink scaling from the log-sum-exp), not a gate of the input")
    proj = _walk_back_to_projection(gm, other)
    gx, _, w, b = x_of(gm, proj, env)
    if gx is not x:
        raise _Skip(f"the output gate '{other.name}' reads another input than the attention's queries")
    pval = env[proj]
    n_rows = pval.shape[-1]
    ntok = pval.numel() // n_rows
    tag0 = (torch.arange(ntok)[:, None] * n_rows + torch.arange(n_rows)[None, :]).reshape(pval.shape)
    path = _path(proj, other)
    gt = _propagate(path, proj, tag0, env).get(other)
    shape = tuple(env[ours].shape)
    if not isinstance(gt, torch.Tensor) or torch.broadcast_shapes(gt.shape, shape) != shape \
            or att_tag.shape != shape:
        raise _Skip("could not follow the output gate's rows to the attention output")
    gt = torch.broadcast_to(gt, shape)
    n_cols = hq * dv
    if not torch.equal(gt // n_rows, att_tag // n_cols):
        raise _Skip("the output gate mixes tokens")
    col, row = (att_tag % n_cols).flatten(), (gt % n_rows).flatten()
    rows = torch.full((n_cols,), -1, dtype=torch.long)
    rows[col] = row
    if not torch.equal(rows[col], row) or bool((rows < 0).any()):
        raise _Skip("the output gate does not give each attention feature one gate row")
    rows = rows.reshape(hq, dv)
    if torch.equal(rows, rows[:, :1].expand_as(rows)):
        rows = rows[:, :1]  # one gate per head
    act, names = _act(path, proj, other, env)
    return OutputGate(w[rows], None if b is None else b[rows], act, ", ".join(names) or "identity")
