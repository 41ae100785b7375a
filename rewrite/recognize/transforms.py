"""Per-head transforms: the compute ops between the projection and the core (RoPE, q/k/v norms), replayed on
``[B, H, S, d]`` values as a ``HeadTransform``.

Each op runs in the layout it had in the model (BHSD, BSHD, (BH)SD) and its result is brought back to
(B, H, S, d), so the transform works for any head count; values may carry trailing pair dims
((B, H, S, d/2, 2): ``stack(...).flatten(-2)``, ``view_as_complex``), and reshapes keep the token and head dims
as they come (``reshape_tail``). Ops on the whole projection before the head split (OLMo-2's q/k norm over
all H·d features) run on the flat (B, S, H·d) value; such a transform is exact only at its own head count
(``HeadTransform.heads``). The RoPE layout is then read by execution (``rope.rope_layout``).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..ir import HeadTransform
from .common import INDEX_OPS, SCALAR_OPS, _Skip, op_name
from . import layout
from .rope import is_linear, rope_layout

def _has_head_axis(value, kind: str, n_heads: int) -> bool:
    """An operand of a per-head op with one entry per head (a per-head bias, DeBERTa's value bias): the transform
    then holds that head count and is not head-agnostic."""
    if not isinstance(value, torch.Tensor) or n_heads < 2:
        return False
    axis = {"BHSD": -3, "BSHD": -2}.get(kind)
    return axis is not None and value.ndim >= -axis and value.shape[axis] == n_heads


def _build_transform(path, proj, tags, env, lay, n_rows, head_of_row, dpos_of_row, n_heads, dh, core_in, role):
    """The ops between the head split and the core, replayed on (B, H, S, d) values."""
    cls = {n: layout._classify(tags[n], lay, n_rows, head_of_row, dpos_of_row, n_heads, dh)
           for n in [proj, *path]}
    g = fx.Graph()
    X = g.placeholder("x")
    cv: dict = {proj: X}  # canonical (B, H, S, d) value of each path node
    kinds: dict = {proj: "flat"}
    sides: list = []
    side_ph: dict = {}
    consts: dict = {}
    replayed = []
    whole = False  # an op acts on all heads' features at once: exact at this head count only
    per_head = False  # an operand holds one entry per head (a per-head bias): exact at this head count only

    def side(a: fx.Node):
        if a.op == "get_attr":
            key = a.target.replace(".", "_")
            consts[key] = _get_attr_from_env(a, env)
            return g.get_attr(key)
        if a not in side_ph:
            side_ph[a] = g.placeholder(f"side_{len(sides)}")
            sides.append(a)
        return side_ph[a]

    def to_kind(v, kind, ndim):
        if kind == "BHSD":
            return v
        if kind == "BSHD":
            return g.call_method("transpose", (v, 1, 2))
        if kind == "(BH)SD":
            return g.call_method("flatten", (v, 0, 1))
        if kind == "flat" and ndim in (2, 3):  # the whole projection before the head split (OLMo-2 q/k norm)
            return g.call_function(to_flat, (v, lay.L, ndim))
        raise _Skip(f"{role} path: an op on a tensor laid out as {kind} cannot be replayed per head")

    def from_kind(v, kind):
        if kind == "BHSD":
            return v
        if kind == "BSHD":
            return g.call_method("transpose", (v, 1, 2))
        b = g.call_method("size", (X, 0))
        if kind == "flat":
            return g.call_function(from_flat, (v, lay.L, b, dh))
        return g.call_method("unflatten", (v, 0, (b, -1)))

    raw: dict = {}  # node -> its value in the projection's own flat layout (ops over the whole projection)
    split_of: dict = {}  # a multi-output index op (chunk, split, unbind) -> its input, replayed when a part is computed on

    def canon(a):  # the canonical (B, H, S, d) value of a path node
        if a not in cv:
            cv[a] = from_kind(raw[a], "flat")
        return cv[a]

    def as_kind(a, kind):  # the value of a path node in the layout ``kind`` it had in the model
        return raw[a] if kind == "flat" and a in raw else to_kind(canon(a), kind, env[a].ndim)

    for n in path:
        name = op_name(n)
        chain = [a for a in n.all_input_nodes if a in kinds]
        c = cls.get(n)
        if name in INDEX_OPS and len(chain) == 1 and (c is None or (c[2] and not _paired(chain[0], kinds, env))
                                                      or bool((c[1] < 0).any())):
            # a pure rearrangement of the canonical value, an intermediate of one (repeat_kv), or a
            # part of a fused projection that still holds other heads
            if chain[0] in raw and c is not None and c[0] == "flat":
                raw[n] = raw[chain[0]]
            else:
                cv[n] = canon(chain[0])
            kinds[n] = c[0] if c is not None else None
            if isinstance(env.get(n), (tuple, list)):
                split_of[n] = chain[0]
            continue
        if name == "getitem" and len(chain) == 1 and chain[0] in split_of and kinds.get(split_of[chain[0]]) not in (
                None, "flat"):  # a part of the head dims (gpt-oss RoPE: torch.chunk(x, 2, -1)), computed on next
            parts, src = chain[0], split_of[chain[0]]
            kind = kinds[src]
            remap = lambda a: as_kind(a, kind) if a is src else side(a)  # noqa: E731
            split = g.create_node(parts.op, parts.target, fx.map_arg(parts.args, remap), fx.map_arg(parts.kwargs, remap))
            cv[n] = from_kind(g.call_function(operator.getitem, (split, n.args[1])), kind)
            kinds[n] = kind
            replayed.append(op_name(parts))
            continue
        if not chain:
            raise _Skip(f"{role} path: '{n.name}' lost track of the heads")
        kind = kinds[chain[0]]
        scalar = name in SCALAR_OPS and not any(a not in kinds for a in n.all_input_nodes)
        if scalar:  # elementwise with Python scalars: layout-free
            flat = any(a in raw for a in chain)
            args = {a: (raw[a] if a in raw else to_kind(canon(a), "flat", env[a].ndim)) if flat else canon(a)
                    for a in chain}
            out = g.create_node(n.op, n.target, fx.map_arg(n.args, args.__getitem__),
                                fx.map_arg(n.kwargs, args.__getitem__))
            (raw if flat else cv)[n] = out
            kinds[n] = "flat" if flat else kind
            replayed.append(name)
            continue
        if kind is None:
            raise _Skip(f"{role} path: '{n.name}' ({name}) acts on a tensor with no per-head layout: it mixes "
                        "tokens or heads (such as a convolution over the sequence), which no per-head op replays")
        if any(kinds[a] != kind for a in chain):
            raise _Skip(f"{role} path: '{n.name}' mixes tensors of different head layouts")
        conv = {a: as_kind(a, kind) for a in chain}
        whole = whole or kind == "flat"
        if name in RESHAPES:  # sizes named by the traced graph: keep the leading (token, head) dims as they come
            out = g.call_function(reshape_tail, (conv[chain[0]], _LEAD[kind], _tail(n, chain[0], env, kind, role)))
        else:
            new_args = fx.map_arg(n.args, lambda a: conv[a] if a in conv else side(a))
            new_kwargs = fx.map_arg(n.kwargs, lambda a: conv[a] if a in conv else side(a))
            out = g.create_node(n.op, n.target, new_args, new_kwargs)
        out_kind = c[0] if c is not None else kind
        if out_kind != kind:
            raise _Skip(f"{role} path: '{n.name}' changes the head layout inside a per-head op")
        if kind == "flat":  # kept as it is: reductions over the projection ((B, S, 1)) have no per-head form
            raw[n] = out
        else:
            cv[n] = from_kind(out, kind)
            per_head = per_head or any(_has_head_axis(env.get(a), kind, n_heads) for a in n.all_input_nodes
                                       if a not in conv)
        kinds[n] = kind
        replayed.append(name)
    if not replayed:
        return None, [], {}
    g.output(canon(core_in))
    gm = fx.GraphModule(consts, g)
    description = ", ".join(sorted(set(replayed))) + (f" over the whole projection of {n_heads} heads" if whole else
                                                      f" with per-head constants for {n_heads} heads" if per_head else "")
    transform = HeadTransform(gm, len(sides), description, heads=n_heads if whole or per_head else None)
    dtype = env[proj].dtype if env[proj].is_floating_point() else None
    return transform, sides, _describe(transform, sides, env, lay, replayed, dh, dtype or torch.float32)


def to_flat(x, layout: str, ndim: int):
    """(B, H, S, d) -> the projection's own layout (B, S, H·d) | (S, B, H·d), or its 2-D (tokens, H·d)."""
    y = (x.transpose(1, 2) if layout == "BSD" else x.permute(2, 0, 1, 3)).flatten(2)
    return y if ndim == 3 else y.flatten(0, 1)


def from_flat(y, layout: str, b: int, d: int):
    """The inverse of ``to_flat``: (B, S, H·d) | (S, B, H·d) | (tokens, H·d) -> (B, H, S, d)."""
    if y.dim() == 2:
        y = y.unflatten(0, (b, -1)) if layout == "BSD" else y.unflatten(0, (-1, b))
    y = y.unflatten(-1, (-1, d))
    return y.transpose(1, 2) if layout == "BSD" else y.permute(1, 2, 0, 3)


def _paired(n: fx.Node, kinds: dict, env: dict) -> bool:
    """``n`` holds per-head values with more trailing dims than (…, d), e.g. RoPE pairs (…, d/2, 2)."""
    base = {"BHSD": 4, "BSHD": 4, "(BH)SD": 3}.get(kinds.get(n))
    return base is not None and env[n].ndim > base


RESHAPES = {"view", "reshape", "_unsafe_view"}
_LEAD = {"BHSD": 3, "BSHD": 3, "(BH)SD": 2}  # token and head dims of each layout


def reshape_tail(x, lead: int, tail: tuple):
    """``x`` with its per-head dims after the first ``lead`` reshaped to ``tail``: (B, H, S, d) -> (B, H, S, d/2, 2)."""
    return x.reshape(*x.shape[:lead], *tail)


def _tail(n: fx.Node, src: fx.Node, env: dict, kind: str, role: str) -> tuple:
    """The per-head shape a reshape gives, when it leaves the token and head dims alone."""
    lead = _LEAD[kind]
    a, b = env[src].shape, env[n].shape
    if tuple(a[:lead]) != tuple(b[:lead]):
        raise _Skip(f"{role} path: '{n.name}' reshapes across heads or tokens inside a per-head op")
    return tuple(int(s) for s in b[lead:])


def _get_attr_from_env(node: fx.Node, env: dict):
    return env[node]


def _describe(transform: HeadTransform, sides: list, env: dict, lay, replayed, dh, dtype) -> dict:
    """RoPE layout (read by execution, ``rope.rope_layout``) and whether a q/k norm is among the ops."""
    names = set(replayed)
    side_values = [env[a] for a in sides]
    rope, dims = rope_layout(transform, side_values, lay.B, lay.S, dh, dtype)
    try:  # a norm, or any other op that is not linear: no rotation of the heads commutes with it
        norm = bool({"rsqrt", "native_layer_norm", "layer_norm", "rms_norm", "linalg_vector_norm"} & names) \
            or not is_linear(transform, side_values, lay.B, lay.S, dh, dtype)
    except Exception:  # noqa: BLE001 - a transform that cannot be probed is treated as a norm (nothing commutes)
        norm = True
    if rope is None and "neg" in names:  # looks rotary but could not be probed: no pass may rely on a layout
        rope, dims = "other", dh
    return {"rope": rope, "rotary_dims": dims, "norm": norm}
