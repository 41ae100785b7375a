"""Sliding-window softmax + linear attention under one normalisation (LoLCATs, Zhang et al. 2024), causal:

    o_t = (Σ_{t−W<j≤t} γ_h e^{s_tj − m_t} v_j + Σ_{j≤t−W} φ(q_t)·φ(k_j) v_j)
          / (Σ_{t−W<j≤t} γ_h e^{s_tj − m_t} + Σ_{j≤t−W} φ(q_t)·φ(k_j))

s_tj = q_t·k_j·scale, m_t = max of s_tj over the window's kept keys, γ_h = sigmoid(g_h) a learned factor per
query head (LoLCATs: ``window_factors``, init 0, linear factor 1). Keys a padding mask drops are in neither sum.
With W ≥ the sequence length the linear sum is empty and γ_h cancels: softmax attention exactly.

``hybrid_sums`` computes the two sums for queries at the last Sq of Sk positions: the window part blockwise
(chunks of C queries against the C + P keys that reach them, P = ⌈(W − 1)/C⌉·C), the linear part as causal linear
attention over keys lagged by W positions (``lit._causal_chunked``). ``hybrid_step`` decodes from a
``rewrite.cache.WindowStateLayer``: the last W keys/values plus the state (S, z) of the tokens that left the
window, so the cache does not grow with the sequence.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["hybrid_sums", "hybrid_step"]


def _window_sums(q, k, v, keep, scale: float, window: int, gamma, chunk: int):
    """Σ_win γ e^{s−m} v and Σ_win γ e^{s−m} for every query (Sq = Sk), blockwise."""
    b, h, s, d = q.shape
    dv = v.shape[-1]
    reach = math.ceil((window - 1) / chunk) * chunk  # keys before a chunk its queries' windows reach
    pad = (chunk - s % chunk) % chunk
    span = chunk + reach
    kw = F.pad(k, (0, 0, reach, pad)).unfold(2, span, chunk)  # (B, H, n, d, C+P)
    vw = F.pad(v, (0, 0, reach, pad)).unfold(2, span, chunk)  # (B, H, n, dv, C+P)
    real = torch.ones(b, 1, s, dtype=torch.bool, device=q.device) if keep is None else keep[..., 0] > 0
    real = F.pad(real, (reach, pad), value=False).unfold(-1, span, chunk)  # (B, 1|H, n, C+P)
    qc = F.pad(q, (0, 0, 0, pad)).reshape(b, h, -1, chunk, d)  # (B, H, n, C, d)
    scores = torch.einsum("bhncd,bhndm->bhncm", qc, kw) * scale  # (B, H, n, C, C+P)
    lag = (torch.arange(chunk, device=q.device)[:, None] + reach
           - torch.arange(span, device=q.device)[None, :])  # t − j
    inside = (lag >= 0) & (lag < window)
    scores = scores.masked_fill(~(inside & real[:, :, :, None, :]), float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows without a kept key: all zero
    e = torch.exp(scores - top) * gamma.view(1, h, 1, 1, 1)
    num = torch.einsum("bhncm,bhnem->bhnce", e, vw).reshape(b, h, -1, dv)[:, :, :s]
    den = e.sum(-1).reshape(b, h, -1, 1)[:, :, :s]
    return num, den


def hybrid_sums(q, k, v, fq, fk, keep: Optional[torch.Tensor], scale: float, window: int, gamma, chunk: int = 64):
    """(numerator [B, H, Sq, dv], denominator [B, H, Sq, 1]) of the hybrid for queries at the last Sq of the Sk
    key positions. q, k: [B, H, S, d] (keys expanded to the query heads), v: [B, H, Sk, dv], fq/fk their
    features, keep: [B, 1|H, Sk, 1] 0/1 (None: all keys), gamma [H]. All fp32."""
    from rewrite.passes.lit import _causal_chunked

    sq, sk = q.shape[2], k.shape[2]
    if sq < sk:  # the queries are the last Sq positions: run all Sk positions, the first ones on zero queries
        q, fq = (F.pad(t, (0, 0, sk - sq, 0)) for t in (q, fq))
    w = min(window, sk)
    num, den = _window_sums(q, k, v, keep, scale, w, gamma, chunk)
    if w < sk:  # keys j ≤ t − W: causal linear attention over keys and values moved W positions later
        fk = fk if keep is None else fk * keep
        lagged_k, lagged_v = (F.pad(t, (0, 0, w, 0))[:, :, :sk] for t in (fk, v))
        n_lin, d_lin = _causal_chunked(fq, lagged_k, lagged_v, chunk)
        num, den = num + n_lin, den + d_lin
    return num[:, :, sk - sq:], den[:, :, sk - sq:]


def hybrid_step(fn, op, q, k, v, mask, cache):
    """The new tokens' outputs from the cached window and state, then the cache moves on: the tokens that leave
    the window (all but the last W of cached + new) are folded into S += Σ φ(k)ᵀv, z += Σ φ(k) per (key head,
    value head) pair; the last W keys and values are kept."""
    from rewrite.cache import WindowStateLayer
    from rewrite.passes.lit import _pairs, key_keep

    layer = cache.own_layer(WindowStateLayer, "a sliding-window + linear site needs its own cache layer")
    past, sq = layer.tokens, q.shape[2]
    wk, wv = layer.window()
    held = 0 if wk is None else wk.shape[2]
    ks, vs = (k, v) if wk is None else (torch.cat([wk, k], 2), torch.cat([wv, v], 2))  # positions past−held ..
    keep = None if mask is None else key_keep(mask[..., past - held:past + sq])
    kq = op._expand(ks, op.k_map, op._k_group).float()
    vq = op._expand(vs, op.v_map, op._v_group).float()
    fq = fn.phi(q, "q")
    num, den = hybrid_sums(q.float(), kq, vq, fq, op._expand(fn.phi(ks, "k"), op.k_map, op._k_group), keep,
                           op.scale, fn.window, fn.gamma())
    pair_of_q, k_of_pair, v_of_pair = _pairs(op)
    s0, z0 = layer.state()
    if s0 is not None:
        num = num + torch.einsum("bhsd,bhde->bhse", fq, s0.index_select(1, pair_of_q))
        den = den + torch.einsum("bhsd,bhd->bhs", fq, z0.index_select(1, pair_of_q)).unsqueeze(-1)
    leaving = ks.shape[2] - fn.window
    s_new, z_new = s0, z0
    if leaving > 0:
        fk = fn.phi(ks[:, :, :leaving], "k")
        if keep is not None:
            fk = fk * keep[:, :, :leaving]
        fk, vf = fk.index_select(1, k_of_pair), vs[:, :, :leaving].float().index_select(1, v_of_pair)
        s_add, z_add = torch.einsum("bpsd,bpse->bpde", fk, vf), fk.sum(2)
        s_new, z_new = (s_add, z_add) if s0 is None else (s0 + s_add, z0 + z_add)
    layer.absorb_window(ks[:, :, -fn.window:], vs[:, :, -fn.window:], s_new, z_new, sq)
    return (num / den.clamp_min(fn.eps)).to(q.dtype)
