"""Multi-head latent attention sites (DeepSeek-V2/V3): the values are an up-projection of a *latent*, a slice of
another projection of x under a norm; the rest of that projection is the shared RoPE key.

    x ─W_dkv→ [c_raw | k_raw];  c = norm(c_raw) ─W_up→ [k_nope | v] per head;  k = [k_nope ; RoPE(k_raw)]
    x ─(W_dq → norm)→ W_q → [q_nope | q_raw] per head;  q = [q_nope ; RoPE(q_raw)]

Found by structure (the value projection's input comes, through elementwise ops, from a slice of another
projection), read by execution: each piece (the norms, the two RoPE maps) is the part of the graph between
two nodes whose values are found by matching (the raw slice, the rotated half of the core's q and k), cut out
as an fx graph. Heads are in the projections' order ``[H, d_nope + d_rope]`` / ``[H, d_nope + dv]``; a model that
lays them out otherwise fails the confirmation by execution and is refused.
"""
from __future__ import annotations

import math
import types
from typing import Optional

import torch
from torch import fx

from ..ir import HeadTransform, SiteInfo
from ..latent import LatentAttention
from .common import HEAD_OPS, Match, _common_prefix, _module_path, _Skip, op_name
from .layout import _Layout
from .paths import _output_projection
from .projections import _path, _projection, _walk_back_to_projection
from .rope import rope_layout
from .transforms import reshape_tail

SLICES = {"getitem", "slice", "narrow"}
RESHAPES = {"view", "reshape", "_unsafe_view"}


def latent_source(gm, core, env) -> Optional[tuple]:
    """(W_up node, latent node c [B, S, r], W_dkv node, raw latent slice) when the core's values are
    up-projected from a normed slice of another projection; None for every other site."""
    try:
        up = _walk_back_to_projection(gm, core.v)
    except _Skip:
        return None
    c = _projection(gm, up)[0]
    while op_name(c) in HEAD_OPS and env[c].ndim != 3 and c.all_input_nodes:
        c = c.all_input_nodes[0]
    if not isinstance(env.get(c), torch.Tensor) or env[c].ndim != 3:
        return None
    frontier, seen = [c], {c}
    for _ in range(24):  # through the norm's elementwise ops, never through a projection
        nxt = []
        for n in frontier:
            if op_name(n) in SLICES:
                base = n.args[0]
                base = base.args[0] if op_name(base) in ("split", "split_with_sizes") else base
                if _projection(gm, base) is not None:
                    return up, c, base, n
            if _projection(gm, n) is not None:
                return None  # a projection's whole output (a residual stream): an ordinary site
            nxt += [a for a in n.all_input_nodes if a not in seen and a.op not in ("get_attr", "placeholder")]
            seen.update(nxt)
        frontier = nxt
        if not frontier:
            return None
    return None


def _cut(start: fx.Node, end: fx.Node, env: dict, role: str, squeeze: bool = False) -> tuple:
    """The graph between ``start`` and ``end`` as ``f(start value, *sides)``: a ``HeadTransform`` and its side
    nodes. Reshapes keep the leading (B, H, S) dims of their input; stored tensors become constants."""
    g = fx.Graph()
    X = g.placeholder("x")
    val = {start: g.call_method("squeeze", (X, 1)) if squeeze else X}
    sides, consts, side_ph = [], {}, {}

    def arg(a):
        if a in val:
            return val[a]
        if a.op == "get_attr":
            key = a.target.replace(".", "_")
            consts[key] = env[a]
            return g.get_attr(key)
        if not isinstance(env.get(a), torch.Tensor):
            raise _Skip(f"{role}: '{a.name}' (not a tensor) feeds the {role} from outside")
        if a not in side_ph:
            side_ph[a] = g.placeholder(f"side_{len(sides)}")
            sides.append(a)
        return side_ph[a]

    names = []
    for n in _path(start, end):
        names.append(op_name(n))
        if op_name(n) in RESHAPES and n.args[0] in val:
            a, b = env[n.args[0]].shape, env[n].shape
            lead = 3 if len(a) >= 4 and len(b) >= 4 and tuple(a[:3]) == tuple(b[:3]) else None
            if lead is None:
                raise _Skip(f"{role}: '{n.name}' reshapes across heads or tokens")
            val[n] = g.call_function(reshape_tail, (val[n.args[0]], 3, tuple(int(s) for s in b[3:])))
            continue
        val[n] = g.create_node(n.op, n.target, fx.map_arg(n.args, arg), fx.map_arg(n.kwargs, arg))
    if end not in val:
        raise _Skip(f"{role}: '{end.name}' does not follow from '{start.name}'")
    g.output(val[end])
    return HeadTransform(fx.GraphModule(consts, g), len(sides), ", ".join(sorted(set(names)))), sides


def _find(nodes, env, want: torch.Tensor, last: bool) -> Optional[fx.Node]:
    """The first (or last) of ``nodes`` whose value is ``want`` (same shape, equal to round-off)."""
    hits = [n for n in nodes if isinstance(env.get(n), torch.Tensor) and env[n].shape == want.shape
            and env[n].dtype == want.dtype and torch.allclose(env[n], want, rtol=1e-6, atol=1e-6)]
    return (hits[-1] if last else hits[0]) if hits else None


def _descendants(start: fx.Node, limit: int = 400) -> list:
    """Nodes reachable from ``start`` (graph order), at most ``limit``."""
    seen, stack = {start}, [start]
    while stack and len(seen) < limit:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return [n for n in start.graph.nodes if n in seen]


def _columns(whole: torch.Tensor, part: torch.Tensor) -> Optional[int]:
    """The offset o with part == whole[..., o:o + width], or None."""
    w = part.shape[-1]
    for o in range(whole.shape[-1] - w + 1):
        if torch.equal(whole[..., o:o + w], part):
            return o
    return None


def match_latent(gm, core, env, found, check) -> Match:
    """The ``LatentAttention`` of an MLA site (``found`` from ``latent_source``), confirmed by ``check``."""
    up, c, dkv, c_raw = found
    x, w_dkv_all, b_dkv_all = _projection(gm, dkv)
    if env[x].ndim != 3:
        raise _Skip(f"latent attention: projection input '{x.name}' is not (batch, seq, dim)")
    B, S, D = env[x].shape
    q_val, k_val, v_val = env[core.q], env[core.k], env[core.v]
    if q_val.ndim != 4 or tuple(q_val.shape[:1]) + tuple(q_val.shape[2:3]) != (B, S):
        raise _Skip("latent attention: the core's queries are not laid out (batch, heads, seq, dim)")
    H, dqk, dv = q_val.shape[1], q_val.shape[-1], v_val.shape[-1]
    whole = env[dkv]
    r = env[c_raw].shape[-1]
    off = _columns(whole, env[c_raw])
    if off is None:
        raise _Skip("latent attention: the latent is not a column slice of its projection")
    rest = [i for i in range(whole.shape[-1]) if not off <= i < off + r]
    dr, dn = len(rest), dqk - len(rest)
    if dn < 0 or k_val.shape[-1] != dqk:
        raise _Skip(f"latent attention: {len(rest)} RoPE key columns for query heads of size {dqk}")
    # the RoPE key: raw slice -> rotated value in the core's keys (the last dr dims of each head)
    kraw = whole[..., rest]
    after = [n for n in _descendants(dkv) if n is not c_raw]
    k_start = _find(after, env, kraw.unsqueeze(1), last=True) or _find(after, env, kraw, last=True)
    k_end = _find(after, env, k_val[:, :1, :, dn:].contiguous(), last=False)
    if k_start is None or k_end is None:
        raise _Skip("latent attention: could not follow the shared RoPE key into the core's keys")
    k_rope, k_sides = _cut(k_start, k_end, env, "key RoPE", squeeze=env[k_start].ndim == 3)
    kv_norm, norm_sides = _cut(c_raw, c, env, "latent norm") if c is not c_raw else (None, [])
    # the query: one projection of x, or a down-projection, a norm and an up-projection
    pq = _walk_back_to_projection(gm, core.q)
    q_in, w_q, b_q = _projection(gm, pq)
    w_dq = b_dq = q_norm = None
    q_sides = []
    if q_in is not x:
        pdq = _walk_back_to_projection(gm, q_in)
        qx, w_dq, b_dq = _projection(gm, pdq)
        if qx is not x:
            raise _Skip("latent attention: the query does not come from the site's input")
        q_norm, q_sides = _cut(pdq, q_in, env, "query norm")
    if q_sides or norm_sides:
        raise _Skip("latent attention: a norm reads values from outside the site")
    qh = env[pq].reshape(B, S, H, dqk).transpose(1, 2)
    if not torch.allclose(q_val[..., :dn], qh[..., :dn], rtol=1e-6, atol=1e-6):
        raise _Skip("latent attention: the queries' first d_nope dims are not their projection's")
    q_after = _descendants(pq)
    q_start = _find(q_after, env, qh[..., dn:].contiguous(), last=True)
    q_end = _find(q_after, env, q_val[..., dn:].contiguous(), last=False)
    if q_start is None or q_end is None:
        raise _Skip("latent attention: could not follow the query's RoPE part into the core's queries")
    q_rope, q_rope_sides = _cut(q_start, q_end, env, "query RoPE")
    _, w_up, b_up = _projection(gm, up)
    if w_up.shape[0] != H * (dn + dv) or b_up is not None:
        raise _Skip(f"latent attention: the up-projection has {w_up.shape[0]} rows for {H} heads of "
                    f"{dn} + {dv}")
    w_up = w_up.reshape(H, dn + dv, r)
    q_like = types.SimpleNamespace(lay=_Layout("BSD", B, S), kv_map=torch.arange(H), kind="BHSD", x=x)
    o_proj, wo, bo, out_2d, _, gate = _output_projection(gm, core, q_like, env)
    if gate is not None:
        raise _Skip("latent attention with an output gate is not supported")
    name = _common_prefix([_module_path(core.node), _module_path(o_proj)])
    side_values = [env[s] for s in q_rope_sides]
    rope, dims = rope_layout(q_rope, side_values, B, S, dr, q_val.dtype)
    info = SiteInfo(name=name, q_len=S, kv_len=S, rope=rope, rotary_dims=dims,
                    mask_kind=None if not core.masks else ("bool" if all(m[0].partition("@")[0] in ("keep", "drop")
                                                                         for m in core.masks) else "additive"))
    scale = core.scale if core.scale is not None else 1.0 / math.sqrt(dqk)
    op = LatentAttention(
        w_q=w_q.reshape(H, dqk, -1), b_q=None if b_q is None else b_q.reshape(H, dqk), w_dq=w_dq, b_dq=b_dq,
        q_norm=q_norm, w_dkv=w_dkv_all[off:off + r], b_dkv=None if b_dkv_all is None else b_dkv_all[off:off + r],
        kv_norm=kv_norm, w_kr=w_dkv_all[rest].reshape(1, dr, D),
        b_kr=None if b_dkv_all is None else b_dkv_all[rest].reshape(1, dr),
        w_uk=w_up[:, :dn], w_uv=w_up[:, dn:], wo=wo, bo=bo, q_rope=q_rope, k_rope=k_rope,
        scale=scale, causal=core.causal, info=info, softcap=core.softcap)
    masks = [(k.replace("@H", f"@{H}"), n) for k, n in core.masks]
    m = Match(name, op, x, None, masks, q_rope_sides + k_sides, o_proj, out_2d)
    check(m)
    return m
