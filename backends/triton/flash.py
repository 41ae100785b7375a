"""Fused attention forward in Triton (online softmax over key tiles).

For query head ``h`` reading key head ``k_map[h]`` and value head ``v_map[h]``::

    S[i, j] = scale * q[b, h, i] . k[b, k_map[h], j]        (-inf where masked)
    O[b, h, i] = head_scale[b, h, i] * sum_j softmax_j(S[i, :])[j] * v[b, v_map[h], j]

Masks: ``causal`` keeps j <= i + (Sk - Sq) (bottom-right aligned, as with a KV cache);
``key_padding_mask[b, j]`` keeps True keys. Rows with no kept key output 0.

Spans (``window``/``sinks [Hq]``, ``rewrite.spans``): a streaming head (w_h > 0) also keeps only
j <= p and (p - j < w_h or j < sink_end[b, h]), p = i + Sk - Sq, sink_end the position after its
s_h-th real key; its tile loop visits only the sink tiles and the window tiles (the rest is skipped).

With ``clip=(zeta, gamma)`` the probabilities are replaced by the clipped softmax
``P' = clamp((zeta - gamma) * softmax(S) + gamma, 0, 1)`` (0 at masked keys). The clamp needs
the final row normaliser, so that path is two-pass: pass 1 computes the row max ``m`` and
sum ``l`` online, pass 2 recomputes ``S``, forms ``exp(S - m) / l``, clips it and accumulates
``P' @ V``.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
import triton
import triton.language as tl

from ._common import check_map, check_qkv, dot_precision, head_block, is_interpreted, new_output, program_heads

__all__ = ["attention_forward", "attention_reference"]

_LOG2E = 1.4426950408889634


@triton.jit
def _score_tile(q, k_base, stride_kn, stride_kd, kpm_base, stride_kpn, offs_m, start_n,
                Sk, dh, causal_off, qk_scale, win, send,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPAN: tl.constexpr):
    """Scores of one key tile in the log2 domain, -inf where masked; returns (s, keep, offs_n)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < Sk) & (offs_d[None, :] < dh), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    keep = (offs_m[:, None] >= 0) & (offs_n[None, :] < Sk)
    if HAS_KPM:
        kp = tl.load(kpm_base + offs_n * stride_kpn, mask=offs_n < Sk, other=0)
        keep = keep & (kp != 0)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
    if SPAN:  # a streaming head: its window and sinks only (win == 0: a full head)
        dist = offs_m[:, None] + causal_off - offs_n[None, :]
        keep = keep & ((win == 0) | ((dist >= 0) & ((dist < win) | (offs_n[None, :] < send))))
    s = tl.where(keep, s, float("-inf"))
    return s, keep, offs_n


@triton.jit
def _load_v(v_base, stride_vn, stride_vd, offs_n, Sk, dv,
            BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr):
    offs_dv = tl.arange(0, BLOCK_DV)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < Sk) & (offs_dv[None, :] < dv), other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _online_tile(m_i, l_i, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, kpm_base, s_pn, offs_m, start_n,
                 Sk, dh, dv, causal_off, qk_scale, win, send,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPAN: tl.constexpr,
                 OUT_TY: tl.constexpr):
    """One key tile of the online softmax: the new (row max, normaliser, accumulator)."""
    s, keep, offs_n = _score_tile(q, k_base, s_kn, s_kd, kpm_base, s_pn, offs_m, start_n,
                                  Sk, dh, causal_off, qk_scale, win, send,
                                  BLOCK_N, BLOCK_D, CAUSAL, HAS_KPM, UPCAST, PRECISION, SPAN)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with no kept key so far has m = -inf: shift by 0 instead (exp2(-inf) = 0)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_v(v_base, s_vn, s_vd, offs_n, Sk, dv, BLOCK_DV, UPCAST)
    acc = acc * alpha[:, None] + tl.dot(p.to(OUT_TY).to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, KMAP, VMAP, KPM, HS, WIN, SEND,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_pb, s_pn,
    s_hb, s_hh, s_hm, s_sb,
    Hq, Sq, Sk, dh, dv,
    qk_scale, zeta, gamma,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_HS: tl.constexpr, CLIP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPAN: tl.constexpr,
):
    """One program per (query tile, batch * query head)."""
    pid_m = tl.program_id(0)
    b, h, kh, vh = program_heads(tl.program_id(1), Hq, KMAP, VMAP)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < dh), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * s_kb + kh * s_kh
    v_base = V + b * s_vb + vh * s_vh
    kpm_base = KPM + b * s_pb

    causal_off = Sk - Sq
    if CAUSAL:
        # keys past the last row's diagonal are masked for the whole tile: skip them
        hi = tl.minimum(Sk, tl.maximum(start_m + BLOCK_M + causal_off, 0))
    else:
        hi = Sk
    win, send, sink_top, lo_start = 0, 0, 0, 0
    if SPAN:  # streaming head: tiles [0, sink_top) hold its sinks, [lo_start, hi) its window
        win = tl.load(WIN + h)
        send = tl.load(SEND + b * s_sb + h)
        lo = tl.maximum(start_m + causal_off - win + 1, 0)
        sink_top = tl.where(win > 0, ((tl.minimum(send, lo) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, 0)
        lo_start = tl.where(win > 0, tl.maximum((lo // BLOCK_N) * BLOCK_N, sink_top), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if CLIP:
        # pass 1: row max and normaliser only
        for start_n in range(0, hi, BLOCK_N):
            s, keep, offs_n = _score_tile(q, k_base, s_kn, s_kd, kpm_base, s_pn, offs_m, start_n,
                                          Sk, dh, causal_off, qk_scale, win, send,
                                          BLOCK_N, BLOCK_D, CAUSAL, HAS_KPM, UPCAST, PRECISION, SPAN)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        # pass 2: exact probabilities, clip, accumulate
        for start_n in range(0, hi, BLOCK_N):
            s, keep, offs_n = _score_tile(q, k_base, s_kn, s_kd, kpm_base, s_pn, offs_m, start_n,
                                          Sk, dh, causal_off, qk_scale, win, send,
                                          BLOCK_N, BLOCK_D, CAUSAL, HAS_KPM, UPCAST, PRECISION, SPAN)
            p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
            p = tl.minimum(tl.maximum((zeta - gamma) * p + gamma, 0.0), 1.0)
            p = tl.where(keep, p, 0.0)
            v = _load_v(v_base, s_vn, s_vd, offs_n, Sk, dv, BLOCK_DV, UPCAST)
            acc += tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, input_precision=PRECISION)
    else:
        for start_n in range(0, sink_top, BLOCK_N):  # a streaming head's sink tiles (none for a full head)
            m_i, l_i, acc = _online_tile(m_i, l_i, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, kpm_base, s_pn,
                                         offs_m, start_n, Sk, dh, dv, causal_off, qk_scale, win, send,
                                         BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_KPM, UPCAST, PRECISION, SPAN,
                                         V.dtype.element_ty)
        for start_n in range(lo_start, hi, BLOCK_N):  # every tile (full head) or the window tiles
            m_i, l_i, acc = _online_tile(m_i, l_i, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, kpm_base, s_pn,
                                         offs_m, start_n, Sk, dh, dv, causal_off, qk_scale, win, send,
                                         BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_KPM, UPCAST, PRECISION, SPAN,
                                         V.dtype.element_ty)
        acc = acc * tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)[:, None]

    if HAS_HS:
        hs = tl.load(HS + b * s_hb + h * s_hh + offs_m * s_hm, mask=offs_m < Sq, other=0.0)
        acc = acc * hs.to(tl.float32)[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od,
             acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < dv))


def sink_ends(sinks: torch.Tensor, key_padding_mask, batch: int, k_len: int) -> torch.Tensor:
    """``[B, Hq]`` int32: the position after each head's ``sinks[h]``-th real key (keys before it are sinks)."""
    real = (torch.ones(batch, k_len, dtype=torch.bool, device=sinks.device) if key_padding_mask is None
            else key_padding_mask.to(sinks.device))
    rank = real.long().cumsum(-1)  # real keys up to and including j, [B, Sk]
    # first j with rank(j) ≥ s (for s = 0: position 0), + 1; Sk when the row has fewer real keys
    reached = rank[:, None, :] >= sinks[None, :, None].clamp_min(1)  # [B, Hq, Sk]
    first = torch.where(reached.any(-1), reached.float().argmax(-1) + 1, torch.full_like(rank[:, :1], k_len))
    return torch.where(sinks[None, :] > 0, first, torch.zeros_like(first)).to(torch.int32).contiguous()


def _check_inputs(q, k, v, k_map, v_map, scale, causal, key_padding_mask, clip, head_scale,
                  kernel):
    check_qkv(q, k, v, kernel=kernel)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    k_map = check_map("k_map", k_map, Hq, k.shape[1], "k", q.device)
    v_map = check_map("v_map", v_map, Hq, v.shape[1], "v", q.device)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor [B, Sk] (True = keep)")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Sk) = {(B, Sk)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if clip is not None:
        if (not isinstance(clip, (tuple, list)) or len(clip) != 2
                or not all(isinstance(c, Real) and not isinstance(c, bool) and math.isfinite(c)
                           for c in clip)):
            raise ValueError(f"clip must be a pair of finite numbers (zeta, gamma), got {clip!r}")
        clip = (float(clip[0]), float(clip[1]))
    if head_scale is not None:
        if not isinstance(head_scale, torch.Tensor) or not head_scale.dtype.is_floating_point:
            raise ValueError("head_scale must be a floating-point tensor [B, Hq, Sq]")
        if tuple(head_scale.shape) != (B, Hq, Sq):
            raise ValueError(
                f"head_scale must have shape (B, Hq, Sq) = {(B, Hq, Sq)}, "
                f"got {tuple(head_scale.shape)}"
            )
        if head_scale.device != q.device:
            raise ValueError(f"head_scale is on {head_scale.device} but q is on {q.device}")
    return k_map, v_map, clip


def _blocks(block_d: int, block_dv: int, itemsize: int, interpreted: bool):
    """(BLOCK_M, BLOCK_N, num_warps). Untuned GPU defaults sized to stay under ~100 KB of shared
    memory (sm_80/86/90); tiny tiles for the interpreter."""
    if interpreted:
        return 16, 16, 4
    widest = max(block_d, block_dv)
    if itemsize > 2:  # fp32 operands
        if widest <= 64:
            return 64, 32, 4
        return (32, 32, 4) if widest <= 128 else (16, 16, 4)
    if widest <= 64:
        return 64, 64, 4
    if widest <= 128:
        return 64, 32, 4
    return 32, 32, 4


def attention_forward(q, k, v, *, k_map, v_map, scale, causal=False, key_padding_mask=None,
                      clip=None, head_scale=None, window=None, sinks=None) -> torch.Tensor:
    """Fused attention ``O = head_scale * softmax(scale * Q K^T + mask) V`` with head maps.

    q ``[B, Hq, Sq, dh]``, k ``[B, Hk, Sk, dh]``, v ``[B, Hv, Sk, dv]``; query head ``h`` uses key
    head ``k_map[h]`` and value head ``v_map[h]``. ``clip=(zeta, gamma)`` selects the clipped
    softmax ``clamp((zeta - gamma) * softmax + gamma, 0, 1)`` (two-pass). Returns
    ``[B, Hq, Sq, dv]`` in q's dtype, accumulated in fp32; fully masked rows are 0. ``window``/``sinks``
    ``[Hq]`` (0 = full head): per-head spans, see the module docstring.
    """
    kernel = _attn_fwd_kernel
    k_map, v_map, clip = _check_inputs(q, k, v, k_map, v_map, scale, causal, key_padding_mask,
                                       clip, head_scale, kernel)
    B, Hq, Sq, dh = q.shape
    Sk, dv = k.shape[2], v.shape[3]
    out, done = new_output(q, k, v)
    if done:
        return out

    interpreted = is_interpreted(kernel)
    block_d, block_dv = head_block(dh), head_block(dv)
    block_m, block_n, num_warps = _blocks(block_d, block_dv, q.element_size(), interpreted)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        s_pb, s_pn = kpm.stride()
    else:
        kpm, s_pb, s_pn = k_map, 0, 0  # dummy pointer, never read
    if head_scale is not None:
        hs = head_scale
        s_hb, s_hh, s_hm = hs.stride()
    else:
        hs, s_hb, s_hh, s_hm = q, 0, 0, 0  # dummy pointer, never read
    zeta, gamma = clip if clip is not None else (1.0, 0.0)
    if window is not None:
        win = window.to(q.device, torch.int32).contiguous()
        send = sink_ends(sinks.to(q.device), key_padding_mask, B, Sk)
        s_sb = send.stride(0)
    else:
        win, send, s_sb = k_map, k_map, 0  # dummy pointers, never read

    grid = (triton.cdiv(Sq, block_m), B * Hq)
    kernel[grid](
        q, k, v, out, k_map, v_map, kpm, hs, win, send,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        s_pb, s_pn, s_hb, s_hh, s_hm, s_sb,
        Hq, Sq, Sk, dh, dv,
        float(scale) * _LOG2E, zeta, gamma,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_HS=head_scale is not None,
        CLIP=clip is not None,
        # the CPU interpreter mis-handles bf16 tl.dot: feed it fp32 operands (exact for bf16/fp16)
        UPCAST=interpreted,
        PRECISION=dot_precision(q.dtype), SPAN=window is not None,
        num_warps=num_warps,
    )
    return out


def attention_reference(q, k, v, *, k_map, v_map, scale, causal=False, key_padding_mask=None,
                        clip=None, head_scale=None, window=None, sinks=None) -> torch.Tensor:
    """Plain-PyTorch (fp32) reference for :func:`attention_forward`, same signature and checks."""
    k_map, v_map, clip = _check_inputs(q, k, v, k_map, v_map, scale, causal, key_padding_mask,
                                       clip, head_scale, None)
    Sq, Sk = q.shape[2], k.shape[2]
    kg = k.index_select(1, k_map).float()
    vg = v.index_select(1, v_map).float()
    s = torch.matmul(q.float(), kg.transpose(-1, -2)) * float(scale)
    keep = torch.ones(q.shape[0], 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        keep = keep & (j <= i + (Sk - Sq))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    if window is not None:
        from rewrite.spans import span_keep

        keep = keep & span_keep(window, sinks, Sq, Sk, key_padding_mask, q.device)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = torch.where(l > 0, e / l.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(e))
    if clip is not None:
        zeta, gamma = clip
        p = ((zeta - gamma) * p + gamma).clamp(0.0, 1.0)
        p = p.masked_fill(~keep, 0.0)
    o = torch.matmul(p, vg)
    if head_scale is not None:
        o = o * head_scale.float()[..., None]
    return o.to(q.dtype)
