"""One q/k/v path (projection → head split → core input) and the path from the core output to W_o."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import fx

from ..ir import HeadTransform
from .common import HEAD_OPS, _Skip, op_name
from .cores import _Core
from .gates import read_gate
from .layout import _Layout, _propagate, _to_bhsd
from .modifiers import _lse_sinks_of
from .projections import _path, _projection, _projection_sources, _walk_back_to_projection
from .transforms import _build_transform

@dataclasses.dataclass
class _Proj:
    x: fx.Node
    flattened: bool
    w: torch.Tensor  # [heads, d, D]
    b: Optional[torch.Tensor]
    kv_map: torch.Tensor  # head at each core position
    kind: str  # layout of the core input
    lay: _Layout
    transform: Optional[HeadTransform]
    sides: list
    rope: Optional[str] = None
    rotary_dims: int = 0
    norm: bool = False
    sources: dict = dataclasses.field(default_factory=dict)


def _x_of(gm, proj_node, env):
    x, w, b = _projection(gm, proj_node)
    flattened = False
    xv = env[x]
    if xv.ndim == 2 and op_name(x) in ("view", "reshape", "_unsafe_view") and env[x.args[0]].ndim == 3:
        x, flattened = x.args[0], True
    if env[x].ndim != 3:
        raise _Skip(f"projection input '{x.name}' has shape {tuple(env[x].shape)}; expected (batch, seq, dim)")
    return x, flattened, w, b


def _read_path(gm, core_in: fx.Node, env: dict, role: str) -> _Proj:
    proj = _walk_back_to_projection(gm, core_in)
    x, flattened, w, b = _x_of(gm, proj, env)
    pval = env[proj]
    n_rows = pval.shape[-1]
    ntok = pval.numel() // n_rows
    tag0 = (torch.arange(ntok)[:, None] * n_rows + torch.arange(n_rows)[None, :]).reshape(pval.shape)
    path = _path(proj, core_in)
    tags = _propagate(path, proj, tag0, env)
    d0, d1 = env[x].shape[:2]
    dh = env[core_in].shape[-1]
    found = None
    for lay in (_Layout("BSD", d0, d1), _Layout("SBD", d1, d0)):
        tokid = lay.tokid()
        for kind in ("BHSD", "(BH)SD"):
            t = _to_bhsd(tags[core_in], kind, lay, dh) if isinstance(tags[core_in], torch.Tensor) else None
            if t is None:
                continue
            tok, row = t // n_rows, t % n_rows
            if torch.equal(tok, tokid[:, None, :, None].expand_as(tok)) and torch.equal(
                    row, row[:1, :, :1, :].expand_as(row)):
                found = (lay, kind, row[0, :, 0, :])
                break
        if found:
            break
    if found is None:
        raise _Skip(f"could not read the {role} head layout between '{proj.name}' and '{core_in.name}'")
    lay, kind, r_core = found
    uniq, kv_map = [], []
    for h in range(r_core.shape[0]):
        key = tuple(r_core[h].tolist())
        if key not in uniq:
            uniq.append(key)
        kv_map.append(uniq.index(key))
    R = torch.tensor(uniq)  # [H, dh] projection rows of each head
    head_of_row = torch.full((n_rows,), -1, dtype=torch.long)
    dpos_of_row = torch.zeros(n_rows, dtype=torch.long)
    for h in range(R.shape[0]):
        head_of_row[R[h]] = h
        dpos_of_row[R[h]] = torch.arange(dh)
    wh = w[R]  # [H, dh, D]
    bh = b[R] if b is not None else None
    transform, sides, info = _build_transform(path, proj, tags, env, lay, n_rows, head_of_row, dpos_of_row,
                                              R.shape[0], dh, core_in, role)
    wname, bname, transposed = _projection_sources(proj)
    sources = {"w": (wname, R.reshape(-1), transposed), "b": (bname, R.reshape(-1), False) if bh is not None else None}
    return _Proj(x, flattened, wh, bh, torch.tensor(kv_map), kind, lay, transform, sides, sources=sources, **info)


CASTS = {"to", "_to_copy", "type_as"}


def _output_projection(gm, core: _Core, q: _Proj, env):
    node = core.node
    path = []
    gated = None  # (mul, its operand on the attention side): the model's own output gate
    while True:
        users = [u for u in node.users if op_name(u) != "_assert_tensor_metadata"]
        if len(users) != 1:
            if any(op_name(u) in ("pow", "mean", "var", "var_mean", "native_layer_norm", "layer_norm", "rms_norm")
                   for u in users):
                raise _Skip(f"a norm of the attention output '{node.name}' before the output projection (over "
                            "all heads' features, BitNet's sub-norm) is not supported: it mixes the heads")
            raise _Skip(f"attention output '{node.name}' has {len(users)} users; expected one path to the "
                        "output projection")
        u = users[0]
        if _projection(gm, u) is not None and _projection(gm, u)[0] is node:
            break
        lse_sinks = _lse_sinks_of(u.args[1] if u.args[0] is node else u.args[0], core.scores, env) \
            if op_name(u) == "mul" and core.sinks is None else None
        if lse_sinks is not None:  # softmax(s)·v·sigmoid(lse(s) − σ): attention sinks (Granite-SWA)
            core.sinks, core.sink_source = lse_sinks
        elif op_name(u) == "mul" and gated is None and len(u.all_input_nodes) == 2:
            gated = (u, node)
        elif op_name(u) in CASTS and env[u].dtype == env[node].dtype and env[u].shape == env[node].shape:
            pass  # a cast to the dtype it already has
        elif op_name(u) not in HEAD_OPS:
            raise _Skip(f"op '{op_name(u)}' between the attention output and the output projection")
        path.append(u)
        node = u
    o_proj = u
    _, w_o, b_o = _projection(gm, o_proj)
    out = env[core.node]
    dv = out.shape[-1]
    lay = q.lay
    tokid = lay.tokid()
    hq = q.kv_map.numel()
    n_cols = hq * dv
    cols = (torch.arange(hq)[:, None] * dv + torch.arange(dv)[None, :])  # [H, dv]
    tag = tokid[:, None, :, None] * n_cols + cols[None, :, None, :]  # (B, H, S, dv)
    if q.kind == "(BH)SD":
        tag = tag.flatten(0, 1)
    elif q.kind != "BHSD":
        raise _Skip(f"attention output in layout {q.kind}")
    tags = _propagate(path, core.node, tag, env)
    t = tags[path[-1]] if path else tag
    gate = None if gated is None else read_gate(gm, gated[0], gated[1], tags[gated[1]], q.x, env, hq, dv, _x_of,
                                                      (core.node, core.q, core.k))
    if t is None or t.shape[-1] != n_cols:
        raise _Skip("could not follow the heads from the attention output to the output projection")
    flat = t.reshape(-1, n_cols)
    if not torch.equal(flat // n_cols, torch.arange(flat.shape[0])[:, None].expand_as(flat)):
        raise _Skip("tokens are reordered between the attention output and the output projection")
    colmap = flat[0] % n_cols
    inv = torch.argsort(colmap)
    wo = w_o[:, inv].reshape(w_o.shape[0], hq, dv)
    out_2d = env[o_proj].ndim == 2
    wname, bname, transposed = _projection_sources(o_proj)
    sources = {"wo": (wname, inv, transposed), "bo": (bname, None, False) if b_o is not None else None}
    return o_proj, wo, b_o, out_2d, sources, gate
