"""Masks of a site: one SDPA mask from the model's masks, and which sites' masks are exactly causal."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx

from ..ir import future_keys, hidden
from .common import Match

def _hide_kind(kind: str, fill, env) -> str:
    """``kind`` ("keep" | "drop") for a fill of -inf, else ``kind=value``: a finite fill such as
    ``finfo.min`` replaces the scores, so a row with every key hidden averages all values."""
    if isinstance(fill, fx.Node):
        fill = env.get(fill)
        fill = float(fill) if isinstance(fill, torch.Tensor) and fill.numel() == 1 else fill
    if isinstance(fill, (int, float)) and not (math.isinf(fill) and fill < 0):
        return f"{kind}={float(fill)!r}"
    return kind


def combine_masks(kinds: tuple, *masks):
    """One SDPA mask from the masks of a hand-written core: bool (True = keep) or additive float.

    kinds: "additive", "keep"/"drop" (hidden = -inf), "keep=v"/"drop=v" (hidden scores replaced by v), in
    the order the model applies them; a suffix ``@H`` marks a term of ``(B·H, Sq, Sk)`` scores.
    """
    if any("@" in k for k in kinds):  # terms added to (B·H, Sq, Sk) scores: (B, H, Sq, Sk)
        masks = tuple(_unfold(x, int(k.partition("@")[2])) if "@" in k else x for k, x in zip(kinds, masks))
        kinds = tuple(k.partition("@")[0] for k in kinds)
    if len(masks) == 1 and kinds[0] in ("keep", "additive"):
        m = masks[0]
    elif len(masks) == 1 and kinds[0] == "drop":
        m = torch.logical_not(masks[0])
    elif all(k in ("keep", "drop") for k in kinds):
        m = None
        for k, x in zip(kinds, masks):
            keep = x if k == "keep" else torch.logical_not(x)
            m = keep if m is None else (m & keep)
    else:  # additive, in order: a fill replaces what is there (finfo.min absorbs the scores in fp32)
        dtype = next((x.dtype for k, x in zip(kinds, masks) if k == "additive"), torch.float32)
        m = torch.zeros((), dtype=dtype, device=masks[0].device)
        for k, x in zip(kinds, masks):
            if k == "additive":
                m = m + x
            else:
                kind, _, value = k.partition("=")
                keep = x if kind == "keep" else torch.logical_not(x)
                m = torch.where(keep, m, float(value) if value else float("-inf"))
    if m.dim() == 3:
        m = m.unsqueeze(1) if m.shape[0] != 1 else m.unsqueeze(0)
    return m


def _unfold(x: torch.Tensor, heads: int) -> torch.Tensor:
    """A term of ``(B·H, Sq, Sk)`` scores as ``(B, H, Sq, Sk)`` (a leading 1 broadcasts: ``(1, 1, Sq, Sk)``)."""
    while x.dim() < 3:
        x = x.unsqueeze(0)
    return x.unsqueeze(0) if x.shape[0] == 1 else x.unflatten(0, (-1, heads))


def _mask_of(m: Match, env) -> Optional[torch.Tensor]:
    masks = [env[n] for _, n in m.masks]
    return combine_masks(tuple(k for k, _ in m.masks), *masks) if masks else None


def _hides_future(mask: torch.Tensor) -> bool:
    """Every key after its query is hidden: ``mask[..., i, j]`` hidden for all ``j > i`` (square masks only)."""
    s = mask.shape[-1]
    if mask.dim() < 2 or mask.shape[-2] != s:
        return False
    return bool(hidden(mask)[..., future_keys(s, mask.device)].all())


def mark_causal_masks(matches: list, envs: list) -> None:
    """Set ``info.causal_mask`` on self-attention sites whose mask hides every later key in all ``envs``.

    Backends may then skip the hidden upper blocks (e.g. the chunked ONNX lowering). ``envs`` should
    include inputs with scrambled values, so that a mask passed in by the caller is not taken for causal.
    """
    for m in matches:
        if m.kv is not None or not m.masks:
            continue
        m.op.info.causal_mask = all(_hides_future(_mask_of(m, e)) for e in envs if e is not None)
