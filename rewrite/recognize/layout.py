"""Head layout by tagged index tensors: each element carries (token, projection row) through the index ops."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import fx

from .common import INDEX_OPS, op_name

def _run_node_with(node: fx.Node, env: dict, overrides: dict):
    args = fx.map_arg(node.args, lambda a: overrides[a] if a in overrides else env[a])
    kwargs = fx.map_arg(node.kwargs, lambda a: overrides[a] if a in overrides else env[a])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if op_name(node) == "cat":  # an empty cache (XLM's cat((past, k))) would promote int tags to float
        args = ([t for t in args[0] if t.numel()],) + tuple(args[1:])
    return node.target(*args, **kwargs)


def _propagate(path: list, source: fx.Node, source_tag, env: dict) -> dict:
    """Run index ops on tag tensors; other ops pass the tag of a same-shaped input through.

    ``view_as_complex`` of (…, d/2, 2) pairs tags each complex element with its real part; elementwise ops
    pass that tag object on unchanged, so ``view_as_real`` finds the pairs again (by the tag's identity).
    """
    tags = {source: source_tag}
    pairs: dict = {}  # id(tag of a complex value) -> (that tag, tag of its (…, 2) real view)
    for n in path:
        chain = [a for a in n.all_input_nodes if a in tags]
        name = op_name(n)
        if name in ("view_as_complex", "view_as_real") and len(chain) == 1 \
                and isinstance(tags[chain[0]], torch.Tensor):
            t = tags[chain[0]]
            if name == "view_as_complex":
                tags[n] = t[..., 0]
                pairs[id(tags[n])] = (tags[n], t)
            else:
                tags[n] = pairs[id(t)][1] if id(t) in pairs else None
            continue
        if name in INDEX_OPS and all(tags[a] is not None for a in chain):
            try:  # a view of strided tags: the values' own memory order may allow it where the tags' does not
                tags[n] = _run_node_with(n, env, {a: tags[a].contiguous() if name in ("view", "_unsafe_view")
                                                  and isinstance(tags[a], torch.Tensor) else tags[a] for a in chain})
                continue
            except Exception:  # noqa: BLE001 - an op that cannot run on int tags is opaque
                pass
        val = env.get(n)
        same = [tags[a] for a in chain if isinstance(tags[a], torch.Tensor) and isinstance(val, torch.Tensor)
                and tags[a].shape == val.shape]
        tags[n] = same[0] if same else None
    return tags


@dataclasses.dataclass
class _Layout:
    """How the x tokens are laid out (L) and the sizes it implies."""

    L: str  # "BSD" | "SBD"
    B: int
    S: int

    def tokid(self) -> torch.Tensor:  # (B, S) -> flat token index in x
        b = torch.arange(self.B)[:, None]
        s = torch.arange(self.S)[None, :]
        return b * self.S + s if self.L == "BSD" else s * self.B + b


KINDS = ("BHSD", "BSHD", "(BH)SD", "flat")


def _to_bhsd(t: torch.Tensor, kind: str, lay: _Layout, d: int, tail: bool = False) -> Optional[torch.Tensor]:
    """Rearrange ``t`` (laid out as ``kind``) to (B, H, S, d); None if the shape does not fit.

    ``tail``: per-head values may carry more trailing dims, (B, H, S, *f) (RoPE's (..., d/2, 2) pairs).
    """
    B, S = lay.B, lay.S
    extra = max(t.ndim - 4, 0) if tail else 0
    try:
        if kind == "BHSD" and t.ndim == 4 + extra and t.shape[0] == B and t.shape[2] == S:
            return t
        if kind == "BSHD" and t.ndim == 4 + extra and t.shape[0] == B and t.shape[1] == S:
            return t.transpose(1, 2)
        if kind == "(BH)SD" and t.ndim == 3 + (max(t.ndim - 3, 0) if tail else 0) and t.shape[0] % B == 0 \
                and t.shape[1] == S:
            return t.reshape(B, -1, *t.shape[1:])
        if kind == "flat" and t.ndim in (2, 3) and t.shape[-1] % d == 0:
            first, second = (B, S) if lay.L == "BSD" else (S, B)
            if t.ndim == 3 and tuple(t.shape[:2]) != (first, second):
                return None
            u = t.reshape(first, second, -1, d)
            return u.transpose(1, 2) if lay.L == "BSD" else u.permute(1, 2, 0, 3)
    except RuntimeError:
        return None
    return None


def _classify(tag, lay: _Layout, n_rows: int, head_of_row, dpos_of_row, n_heads: int, dh: int):
    """(kind, head ids per position, is_identity) of a tag tensor, or None."""
    if not isinstance(tag, torch.Tensor) or tag.dtype != torch.int64:
        return None
    tok, row = tag // n_rows, tag % n_rows
    head = head_of_row[row]
    dpos = dpos_of_row[row]
    tokid = lay.tokid()
    for kind in KINDS:
        if kind == "flat" and tag.shape[-1] % dh:
            continue
        t_tok = _to_bhsd(tok, kind, lay, dh, tail=kind != "flat")
        if t_tok is None:
            continue
        per_head = t_tok.ndim == 4  # (B, H, S, d), no trailing pair dims
        t_head, t_dpos = (_to_bhsd(t, kind, lay, dh, tail=kind != "flat").flatten(3) for t in (head, dpos))
        t_tok = t_tok.flatten(3)
        if t_tok.numel() == 0:  # an empty slice (partial rotary with nothing left to pass through)
            return kind, torch.arange(t_tok.shape[1]), False
        if not torch.equal(t_tok, tokid[:, None, :, None].expand_as(t_tok)):
            continue
        heads = t_head[0, :, 0, 0]
        if not torch.equal(t_head, heads[None, :, None, None].expand_as(t_head)):
            continue
        identity = per_head and bool((heads >= 0).all()) and t_dpos.shape[-1] == dh and torch.equal(
            t_dpos, torch.arange(dh).expand_as(t_dpos))
        return kind, heads, identity
    return None
