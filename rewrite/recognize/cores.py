"""Attention cores: SDPA nodes and hand-written ``softmax(q·kᵀ·scale + mask)·v`` with their scale and masks."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import fx

from .common import MATMULS, PASS_THROUGH, _arg, _Skip, op_name
from .masks import _hide_kind
from .projections import _projection, _weight_of

@dataclasses.dataclass
class _Core:
    node: fx.Node  # whose output is the per-head attention output
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: Optional[float]
    causal: bool
    masks: list
    probs: Optional[fx.Node] = None


def _strip_kt(node: fx.Node) -> fx.Node:
    name = op_name(node)
    if name == "transpose":
        dims = {d % 4 if d < 0 else d for d in node.args[1:3]}
        if dims in ({2, 3}, {1, 2}) or set(node.args[1:3]) == {-2, -1}:
            return node.args[0]
    if name == "permute":
        p = list(node.args[1])
        if p[-2:] == [len(p) - 1, len(p) - 2] or p[-2:] == [-1, -2]:
            return node.args[0]
    raise _Skip(f"key of the score matmul is not a transposed tensor ('{node.name}')")


def _scalar(v, env) -> float:
    if isinstance(v, fx.Node):
        t = env[v]
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t)
        if isinstance(t, (int, float)):
            return float(t)
        raise _Skip(f"score scaling by a non-scalar tensor '{v.name}'")
    return float(v)


def _manual_core(sm: fx.Node, env) -> _Core:
    dim = sm.args[1]
    if dim not in (-1, env[sm].ndim - 1):
        raise _Skip("softmax is not over the last dim")
    scale, masks = 1.0, []
    node = sm.args[0]
    seen_scale = False

    def mask_seen():
        if seen_scale:
            raise _Skip("scores are scaled after the mask was applied")

    while True:
        name = op_name(node)
        if name in MATMULS:
            break
        if name in ("_to_copy", "to", "clone", "contiguous"):
            node = node.args[0]
        elif name in ("mul", "div") and isinstance(node.args[0], fx.Node):
            other = node.args[1]
            if isinstance(other, fx.Node) and env[other].numel() != 1:
                raise _Skip(f"scores are multiplied by a tensor '{other.name}'")
            s = _scalar(other, env)
            seen_scale = True
            scale *= s if name == "mul" else 1.0 / s
            node = node.args[0]
        elif name == "add":
            a, b = node.args[0], node.args[1]
            if not isinstance(b, fx.Node):
                raise _Skip("a constant is added to the scores")
            mask_seen()
            masks.append(("additive", b))
            node = a
        elif name == "masked_fill":
            mask_seen()
            masks.append((_hide_kind("drop", _arg(node, 2, "value"), env), node.args[1]))
            node = node.args[0]
        elif name == "where" and isinstance(node.args[1], fx.Node):
            mask_seen()
            masks.append((_hide_kind("keep", node.args[2], env), node.args[0]))
            node = node.args[1]
        else:
            raise _Skip(f"unsupported op '{name}' between the score matmul and softmax")
    mm = node
    name = op_name(mm)
    if name == "baddbmm":
        masks.append(("additive", mm.args[0]))
        scale *= float(mm.kwargs.get("alpha", 1.0))
        if mm.kwargs.get("beta", 1.0) != 1.0:
            raise _Skip("baddbmm with beta != 1")
        q, kt = mm.args[1], mm.args[2]
    else:
        q, kt = mm.args[0], mm.args[1]
    k = _strip_kt(kt)
    # forward: softmax -> (dropout, casts) -> matmul(p, v)
    p = sm
    probs_users = []
    while True:
        users = list(p.users)
        mm_users = [u for u in users if op_name(u) in MATMULS and u.args[0] is p]
        nxt = [u for u in users if op_name(u) in PASS_THROUGH]
        if mm_users:
            pv = mm_users[0]
            probs_users += [u for u in users if u is not pv]
            break
        if len(nxt) >= 1:
            probs_users += [u for u in users if u is not nxt[0]]
            p = nxt[0]
            continue
        raise _Skip("softmax output does not feed a matmul with v")
    core = _Core(pv, q, k, pv.args[1], scale, False, masks[::-1])
    if any(op_name(u) not in ("_assert_tensor_metadata",) for u in probs_users):
        raise _Skip("attention weights are used outside the attention (need_weights=True); "
                    "call the module with need_weights=False")
    return core


def _sdpa_core(node: fx.Node, env) -> _Core:
    mask = _arg(node, 3, "attn_mask")
    scale = _arg(node, 6, "scale")
    causal = bool(_arg(node, 5, "is_causal", False))
    masks = []
    if isinstance(mask, fx.Node):
        masks.append(("keep" if env[mask].dtype == torch.bool else "additive", mask))
    return _Core(node, node.args[0], node.args[1], node.args[2], scale, causal, masks)


def _cores(gm, env) -> list:
    out = []
    for n in gm.graph.nodes:
        name = op_name(n)
        if name == "scaled_dot_product_attention":
            out.append(n)
        elif name in ("_softmax", "softmax") and n.op == "call_function" and _over_two_streams(gm, n):
            out.append(n)
    return out


PRODUCTS = MATMULS | {"einsum"}


def _over_two_streams(gm, sm: fx.Node, budget: int = 32) -> bool:
    """Whether the softmax ``sm`` is over a product of two computed tensors (q·kᵀ): an attention candidate.

    Walks back from the softmax input (at most ``budget`` nodes), stopping at projections with a stored
    weight. An MoE router or a classifier (softmax of ``linear(x, W)``) is not a candidate.
    """
    frontier, seen = [sm.args[0]], set()
    while frontier and len(seen) < budget:
        node = frontier.pop(0)
        if not isinstance(node, fx.Node) or node in seen or node.op in ("get_attr", "placeholder"):
            continue
        seen.add(node)
        if op_name(node) in PRODUCTS:
            operands = [a for a in node.all_input_nodes if a.op != "get_attr"]
            computed = [a for a in operands if _weight_of(gm, a) is None]
            if op_name(node) == "baddbmm":
                computed = [a for a in computed if a is not node.args[0]]
            if len(computed) >= 2:
                return True
            continue
        if _projection(gm, node) is not None:
            continue
        frontier.extend(node.all_input_nodes)
    return False
