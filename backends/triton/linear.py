"""Linear attention forward in Triton.

With the feature map phi = ReLU (applied in the kernel), per query head ``h`` reading key head
``k_map[h]`` and value head ``v_map[h]``::

    non-causal:  O_t = phi(q_t) (sum_j phi(k_j)^T v_j) / (phi(q_t) . sum_j phi(k_j) + eps)
    causal:      the same with both sums over j <= t + (Sk - Sq)   (bottom-right aligned)

The causal form is computed in prefix form: query tiles are visited in order while a running
fp32 state ``KV = sum phi(k_j)^T v_j`` ``[dh, dv]`` and ``z = sum phi(k_j)`` ``[dh]`` covers all
keys before the tile's key window; the window itself is handled by a masked
``(phi(Q) phi(K)^T) V`` block. One program per (value-column block, batch * query head).
"""
from __future__ import annotations

import math
from numbers import Real

import torch
import triton
import triton.language as tl

from ._common import check_map, check_qkv, dot_precision, head_block, is_interpreted, new_output, program_heads

__all__ = ["linear_attention_forward", "linear_attention_reference"]

FEATURE_MAPS = ("relu",)


@triton.jit
def _load_kv_tile(k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_n, n_lo, n_hi, dh, dv, offs_dv,
                  BLOCK_D: tl.constexpr):
    """phi(K) ``[N, BLOCK_D]`` and V ``[N, BLOCK_DV]`` (fp32) for keys n_lo <= j < n_hi, else 0."""
    offs_d = tl.arange(0, BLOCK_D)
    valid = (offs_n >= n_lo) & (offs_n < n_hi)
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=valid[:, None] & (offs_d[None, :] < dh), other=0.0).to(tl.float32)
    fk = tl.where(valid[:, None], tl.maximum(k, 0.0), 0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
                mask=valid[:, None] & (offs_dv[None, :] < dv), other=0.0).to(tl.float32)
    return fk, v


@triton.jit
def _linear_attn_fwd_kernel(
    Q, K, V, O, KMAP, VMAP,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    Hq, Sq, Sk, dh, dv, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    b, h, kh, vh = program_heads(tl.program_id(1), Hq, KMAP, VMAP)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + kh * s_kh
    v_base = V + b * s_vb + vh * s_vh
    o_base = O + b * s_ob + h * s_oh

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rows = tl.arange(0, BLOCK_M)
    kv = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)

    if CAUSAL:
        off = Sk - Sq
        # keys before the first query's window (j < Sk - Sq) are seen by every query
        for start_n in range(0, off, BLOCK_M):
            fk, v = _load_kv_tile(k_base, v_base, s_kn, s_kd, s_vn, s_vd, start_n + rows,
                                  0, off, dh, dv, offs_dv, BLOCK_D)
            kv += tl.dot(tl.trans(fk), v, input_precision=PRECISION)
            z += tl.sum(fk, 0)
        # query rows start_m + r see the state plus window keys start_m + off + c with c <= r
        lower = rows[None, :] <= rows[:, None]
        for start_m in range(0, Sq, BLOCK_M):
            offs_m = start_m + rows
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                        mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < dh), other=0.0)
            fq = tl.maximum(q.to(tl.float32), 0.0)
            fk, v = _load_kv_tile(k_base, v_base, s_kn, s_kd, s_vn, s_vd, offs_m + off,
                                  0, Sk, dh, dv, offs_dv, BLOCK_D)
            a = tl.dot(fq, tl.trans(fk), input_precision=PRECISION)
            a = tl.where(lower, a, 0.0)
            num = tl.dot(fq, kv, input_precision=PRECISION) + tl.dot(a, v, input_precision=PRECISION)
            den = tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps
            tl.store(o_base + offs_m[:, None] * s_om + offs_dv[None, :] * s_od,
                     (num / den[:, None]).to(O.dtype.element_ty),
                     mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < dv))
            kv += tl.dot(tl.trans(fk), v, input_precision=PRECISION)
            z += tl.sum(fk, 0)
    else:
        for start_n in range(0, Sk, BLOCK_M):
            fk, v = _load_kv_tile(k_base, v_base, s_kn, s_kd, s_vn, s_vd, start_n + rows,
                                  0, Sk, dh, dv, offs_dv, BLOCK_D)
            kv += tl.dot(tl.trans(fk), v, input_precision=PRECISION)
            z += tl.sum(fk, 0)
        for start_m in range(0, Sq, BLOCK_M):
            offs_m = start_m + rows
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                        mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < dh), other=0.0)
            fq = tl.maximum(q.to(tl.float32), 0.0)
            num = tl.dot(fq, kv, input_precision=PRECISION)
            den = tl.sum(fq * z[None, :], 1) + eps
            tl.store(o_base + offs_m[:, None] * s_om + offs_dv[None, :] * s_od,
                     (num / den[:, None]).to(O.dtype.element_ty),
                     mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < dv))


def _check_inputs(q, k, v, k_map, v_map, causal, eps, feature_map, kernel):
    check_qkv(q, k, v, kernel=kernel)
    Hq = q.shape[1]
    k_map = check_map("k_map", k_map, Hq, k.shape[1], "k", q.device)
    v_map = check_map("v_map", v_map, Hq, v.shape[1], "v", q.device)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map {feature_map!r} is not supported; expected one of {FEATURE_MAPS}")
    return k_map, v_map


def _blocks(block_d: int, block_dv: int, itemsize: int, interpreted: bool):
    """(BLOCK_M, BLOCK_DV). Untuned GPU defaults sized to stay under ~100 KB of shared memory."""
    if interpreted:
        return 16, block_dv
    if itemsize > 2:  # fp32 operands
        if block_d <= 64:
            return 32, min(block_dv, 32)
        return 16, min(block_dv, 16)
    if block_d <= 128:
        return 64, min(block_dv, 64)
    return 32, min(block_dv, 32)


def linear_attention_forward(q, k, v, *, k_map, v_map, causal, eps=1e-6,
                             feature_map="relu") -> torch.Tensor:
    """Linear attention ``O_t = phi(q_t) KV / (phi(q_t) . z + eps)`` with phi = ReLU.

    ``KV = sum_j phi(k_j)^T v_j`` and ``z = sum_j phi(k_j)`` run over all keys, or over
    ``j <= t + (Sk - Sq)`` when ``causal``. Shapes and head maps as in ``attention_forward``;
    returns ``[B, Hq, Sq, dv]`` in q's dtype (fp32 state and accumulation).
    """
    kernel = _linear_attn_fwd_kernel
    k_map, v_map = _check_inputs(q, k, v, k_map, v_map, causal, eps, feature_map, kernel)
    B, Hq, Sq, dh = q.shape
    Sk, dv = k.shape[2], v.shape[3]
    out, done = new_output(q, k, v)
    if done:
        return out

    interpreted = is_interpreted(kernel)
    block_d = head_block(dh)
    block_m, block_dv = _blocks(block_d, head_block(dv), q.element_size(), interpreted)
    grid = (triton.cdiv(dv, block_dv), B * Hq)
    kernel[grid](
        q, k, v, out, k_map, v_map,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Sq, Sk, dh, dv, float(eps),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=causal, PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )
    return out


def linear_attention_reference(q, k, v, *, k_map, v_map, causal, eps=1e-6,
                               feature_map="relu") -> torch.Tensor:
    """Plain-PyTorch (fp32, quadratic form) reference for :func:`linear_attention_forward`."""
    k_map, v_map = _check_inputs(q, k, v, k_map, v_map, causal, eps, feature_map, None)
    Sq, Sk = q.shape[2], k.shape[2]
    fq = torch.relu(q.float())
    fk = torch.relu(k.index_select(1, k_map).float())
    vg = v.index_select(1, v_map).float()
    a = torch.matmul(fq, fk.transpose(-1, -2))  # [B, Hq, Sq, Sk]
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        a = a.masked_fill(j > i + (Sk - Sq), 0.0)
    o = torch.matmul(a, vg) / (a.sum(-1, keepdim=True) + eps)
    return o.to(q.dtype)
