"""Per-query-head attention spans: streaming heads (attention sinks + a recent window) beside full heads.

Each query head h has ``window[h] = w_h`` (0: full) and ``sinks[h] = s_h``. With the queries the last Sq of Sk
positions (p = Sk − Sq + i for query i, as with a cache) and the site's own mask M (padding, causal, bias):

    keep(h, i, j) = M(i, j)  and  ( w_h = 0  or  ( j ≤ p  and  ( p − j < w_h  or  rank(j) < s_h ) ) )

    rank(j) = #{ real keys before j in its row },   real = keys that some query may see under M

so the sinks are the first ``s_h`` *real* tokens (left padding is skipped), a streaming head never sees a
later key (even in a bidirectional site), and a full head keeps M untouched. ``w_h ≥ Sk`` equals causal
attention. Hidden entries become ``False`` (bool masks) or ``finfo.min`` (additive masks), as transformers
writes them, so a row hidden by M stays hidden.

``check_span`` refuses bad values (window < 1 for a streaming head, sinks < 0); ``span_mask`` combines the
span with the site's mask for ``Attention.core``; ``span_keep`` is the bare pattern (tests, kernels, ONNX).
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import SpecError

__all__ = ["check_span", "span_keep", "span_mask", "masked_span", "real_key_rows", "streaming_heads"]


def check_span(where: str, window, sinks, heads: int):
    """``(window, sinks)`` as ``[Hq]`` long tensors (None when every head is full); SpecError on bad values."""
    if window is None:
        if sinks is not None and bool(torch.as_tensor(sinks).ne(0).any()):
            raise SpecError(f"{where}: sinks are given without a window; give window=TOKENS for the streaming heads")
        return None, None
    window = torch.as_tensor(window, dtype=torch.long).flatten().cpu()
    sinks = torch.zeros_like(window) if sinks is None else torch.as_tensor(sinks, dtype=torch.long).flatten().cpu()
    if window.numel() == 1:
        window = window.expand(heads).clone()
    if sinks.numel() == 1:
        sinks = sinks.expand(heads).clone()
    if window.numel() != heads or sinks.numel() != heads:
        raise SpecError(f"{where}: window and sinks need one entry per query head ({heads}); got "
                        f"{window.numel()} and {sinks.numel()}")
    if bool((window < 0).any()):
        raise SpecError(f"{where}: window={window.tolist()} must be ≥ 1 for a streaming head (0 = full attention)")
    if bool((sinks < 0).any()):
        raise SpecError(f"{where}: sinks={sinks.tolist()} must be ≥ 0")
    if not bool(window.any()):
        return None, None  # every head full: the op keeps its fast path
    return window, torch.where(window > 0, sinks, torch.zeros_like(sinks))


def streaming_heads(window: Optional[torch.Tensor]) -> list:
    """Indices of the query heads with a window."""
    return [] if window is None else (window > 0).nonzero().flatten().tolist()


def real_key_rows(mask: Optional[torch.Tensor], k_len: int) -> Optional[torch.Tensor]:
    """``[B|1, Sk]`` bool: keys some query (of any head) may see under the SDPA mask; None = every key."""
    if mask is None:
        return None
    from .ir import hidden

    keep = ~hidden(mask)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    return keep.any(dim=2).any(dim=1).expand(keep.shape[0], k_len)


def span_keep(window: torch.Tensor, sinks: torch.Tensor, q_len: int, k_len: int,
              real: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """``[B|1, Hq, Sq, Sk]`` bool: the span part of ``keep`` (True everywhere for full heads)."""
    window, sinks = window.to(device), sinks.to(device)
    pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)  # p of each query, [Sq, 1]
    dist = pos - torch.arange(k_len, device=device)[None, :]  # p − j, [Sq, Sk]
    seen = dist >= 0
    local = seen & (dist < window[:, None, None])  # [Hq, Sq, Sk]
    if real is None:
        rank = torch.arange(k_len, device=device)[None, :]  # [1, Sk]
    else:
        real = real.to(device)
        rank = real.long().cumsum(-1) - real.long()  # real keys before j, [B, Sk]
    sink = seen & (rank[:, None, None, :] < sinks[None, :, None, None])  # [B|1, Hq, Sq, Sk]
    full = (window == 0)[:, None, None]
    return full | local | sink


def span_mask(op, mask: Optional[torch.Tensor], causal: bool, q_len: int, k_len: int, device):
    """The site's mask (or its causal rule when there is none) with the op's spans applied: one per-head mask
    ``[B|1, Hq, Sq, Sk]`` (bool, or additive in the mask's dtype); SDPA then runs it with ``is_causal=False``."""
    return masked_span(op.window, op.sinks, mask, causal, q_len, k_len, device)


def masked_span(window, sinks, mask: Optional[torch.Tensor], causal: bool, q_len: int, k_len: int, device):
    """``span_mask`` for explicit ``window``/``sinks [Hq]``."""
    span = span_keep(window, sinks, q_len, k_len, real_key_rows(mask, k_len), device)
    if mask is None:
        if causal:
            from .ir import causal_keep

            span = span & causal_keep(q_len, k_len, device)
        return span
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        return mask & span
    return torch.where(span, mask, torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=device))
