"""Score modifiers of the canonical op: what a site does to ``s = q·kᵀ·scale`` before the softmax.

    s' = softcap(s) + M[:, bias_map],   softcap(s) = c·tanh(s / c)  (c = ``op.softcap``; none when c = 0)
    p = softmax([s', σ_h])[..., :-1]    (σ = ``op.sink_logits [Hq]``; none when None)

- **Per-query-head additive bias** (ALiBi, T5/MPNet relative-position bias): it travels in the site's mask
  input ``M [B|1, H₀, Sq, Sk]``, computed by the model's own graph from positions. ``op.bias_map [Hq]`` says
  which of the H₀ rows (the heads at recognition) query head i reads, so head-count passes that slice or
  permute query heads slice or permute ``bias_map`` with them (``rewrite.heads``); K/V-only passes (gqa,
  mqa, dha) leave it alone. A mask without a head axis (``M.shape[1] == 1``) is shared by all heads.
- **Soft-cap** (Gemma-2): applied to the scaled scores before the mask, so hidden keys stay hidden.
- **Attention sinks** (gpt-oss, MiMo-V2-Flash): a learned logit σ_h per query head joins every row's softmax
  and is dropped after it, so a row's weights sum to less than 1. Computed as one more key whose score is
  σ_h and whose value is 0 (``append_sink``): the same SDPA / ONNX ``Attention`` call, exactly. Sliced and
  permuted with the query heads like ``bias_map``.
- **Content-dependent score terms** (DeBERTa's disentangled content-to-position attention, a term built
  from the queries or keys themselves) are refused at recognition (``rewrite.recognize.cores``).

Untouched (identity ``bias_map``, ``softcap = 0``) the op computes exactly what SDPA with the mask does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["select_bias", "softcap_scores", "softcapped_attention", "append_sink", "describe"]


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


def append_sink(q, k, v, mask, sinks: torch.Tensor, causal: bool):
    """``(k', v', M')`` with one more key per head, whose score is the sink logit σ_h and whose value is 0:

        softmax([s, σ_h])[..., :-1] · v  =  softmax over keys [k; 0] with M' = [M | σ_h], values [v; 0]

    (the zero key's score is q·0 = 0, and c·tanh(0) = 0 under a soft-cap). ``M'`` is additive ``[B|1, Hq, Sq,
    Sk + 1]``; ``causal`` (no mask) is spelled out bottom-right, as with a cache.
    """
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
    if mask is None:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq) if causal else None
    if mask is None:
        mask = q.new_zeros(1, 1, sq, sk)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    else:
        mask = mask.to(q.dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(mask.shape[0], hq, sq, sk)
    column = sinks.to(device=q.device, dtype=q.dtype).reshape(1, hq, 1, 1).expand(mask.shape[0], hq, sq, 1)
    return k, v, torch.cat([mask, column], dim=-1)


def describe(op) -> str:
    """The op's score modifiers in words ('' for none), for reports and refusals."""
    parts = []
    if op.bias_map is not None:
        parts.append(f"per-head score bias ({op.bias_map.numel()} of {op.bias_heads} rows)")
    if op.softcap:
        parts.append(f"tanh soft-cap c={op.softcap:g}")
    if getattr(op, "sink_logits", None) is not None:
        parts.append(f"attention sinks ({op.sink_logits.numel()} per-head logits)")
    return ", ".join(parts)
