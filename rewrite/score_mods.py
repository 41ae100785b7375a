"""Score modifiers of the canonical op: what a site does to ``s = q·kᵀ·scale`` before the softmax.

    s' = softcap(s) + M[:, bias_map],   softcap(s) = c·tanh(s / c)  (c = ``op.softcap``; none when c = 0)

- **Per-query-head additive bias** (ALiBi, T5/MPNet relative-position bias): it travels in the site's mask
  input ``M [B|1, H₀, Sq, Sk]``, computed by the model's own graph from positions. ``op.bias_map [Hq]`` says
  which of the H₀ rows (the heads at recognition) query head i reads, so head-count passes that slice or
  permute query heads slice or permute ``bias_map`` with them (``rewrite.heads``); K/V-only passes (gqa,
  mqa, dha) leave it alone. A mask without a head axis (``M.shape[1] == 1``) is shared by all heads.
- **Soft-cap** (Gemma-2): applied to the scaled scores before the mask, so hidden keys stay hidden.
- **Content-dependent score terms** (DeBERTa's disentangled content-to-position attention, a term built
  from the queries or keys themselves) are refused at recognition (``rewrite.recognize.cores``).

Untouched (identity ``bias_map``, ``softcap = 0``) the op computes exactly what SDPA with the mask does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["select_bias", "softcap_scores", "softcapped_attention", "describe"]


def select_bias(mask: Optional[torch.Tensor], bias_map: Optional[torch.Tensor], identity: bool):
    """``M[:, bias_map]``: the mask rows of the current query heads (a mask shared by all heads as is)."""
    if mask is None or bias_map is None or identity or mask.dim() != 4 or mask.shape[1] == 1:
        return mask
    return mask.index_select(1, bias_map.to(mask.device))  # (B|1, H₀, Sq, Sk) -> (B|1, Hq, Sq, Sk)


def softcap_scores(s: torch.Tensor, cap: float) -> torch.Tensor:
    """c·tanh(s / c) (the identity for c = 0)."""
    return s if not cap else torch.tanh(s / cap) * cap


def softcapped_attention(q, k, v, mask, scale: float, cap: float, causal: bool) -> torch.Tensor:
    """softmax(c·tanh(q·kᵀ·scale / c) + M) · v over expanded heads, ``(B, Hq, Sq, dv)``.

    ``causal`` (no mask) hides key j from query i when j > i + Sk − Sq (bottom-right, as with a cache).
    """
    s = softcap_scores(torch.matmul(q, k.transpose(-2, -1)) * scale, cap)  # (B, Hq, Sq, Sk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    elif causal:
        sq, sk = s.shape[-2], s.shape[-1]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    p = F.softmax(s.float(), dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def describe(op) -> str:
    """The op's score modifiers in words ('' for none), for reports and refusals."""
    parts = []
    if op.bias_map is not None:
        parts.append(f"per-head score bias ({op.bias_map.numel()} of {op.bias_heads} rows)")
    if op.softcap:
        parts.append(f"tanh soft-cap c={op.softcap:g}")
    return ", ".join(parts)
