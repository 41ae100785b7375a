"""Multi-head latent attention over the latent cache in Triton (decode, and any query length).

For query head ``h`` (RoPE key head ``j = rope_map[h]``), query row ``i`` and cached token ``t``::

    s[i, t] = scale · (q_lat[b, h, i] · c[b, t] + q_rope[b, h, i] · k_rope[b, j, t])     (-inf where masked)
    o_lat[b, h, i] = Σ_t softmax_t(s[i, :]) c[b, t]                                   (online, in key tiles)

``q_lat = W_ukᵀ q_nope`` comes from the caller, which applies ``W_uv`` to ``o_lat`` (``rewrite.latent``'s
absorbed form); per-head K/V is never built. One program per (batch, RoPE key head, tile of rows), a row being
a (query head, query position) pair of the heads reading that RoPE key: every row of a tile reads the same
latent and RoPE-key tiles, so decode (one query) still fills ``tl.dot`` with the heads (16 or more rows).
Few rows and many tokens (decode at small batch) split the tokens over more programs, each writing its
partial output and log-sum-exp, combined after (flash-decoding).

Masks as ``flash.py``: ``causal`` keeps t ≤ i + (T − Sq) (bottom-right, as with a cache), ``key_padding_mask
[B, T]`` keeps True tokens; a row with no kept token gives 0. ``q_nope · b_uk`` is the same for every token
of a row, so softmax drops it (the site refuses a soft-cap, where it would not cancel).

``LatentTritonSite`` runs a ``rewrite.latent.LatentAttention`` with it: with a cache (``generate``) the
latent and the RoPE keys are appended and, once the cache holds earlier tokens, this kernel reads them; when
every token is new (a full forward, a prompt) K/V are up-projected and the flash kernel runs, the cheaper order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from rewrite.errors import BackendError

from ._common import dot_precision, head_block, is_interpreted

__all__ = ["mla_attention", "mla_reference", "head_table", "LatentTritonSite"]

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_kernel(QL, QR, C, KR, HEADS, KPM, O, LSE,
                s_lb, s_lh, s_lm, s_ld, s_rb, s_rh, s_rm, s_rd,
                s_cb, s_cn, s_cd, s_kb, s_kh, s_kn, s_kd, s_pb, s_pn, s_os, s_ob, s_oh, s_om, s_od,
                s_es, s_eb, s_eh, s_em, R, G, Sq, T, r, dr, qk_scale, split_len,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """One program per (batch · RoPE head, tile of G·Sq rows, split of the tokens); with SPLIT each split
    writes its normalised partial output and its log2-sum-exp, combined by ``_combine``."""
    b = (tl.program_id(0) // R).to(tl.int64)
    j = (tl.program_id(0) % R).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Sq
    head = tl.load(HEADS + j * G + rows // Sq, mask=row_ok, other=0).to(tl.int64)
    qpos = rows % Sq
    offs_r, offs_dr = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
    ql = tl.load(QL + b * s_lb + head[:, None] * s_lh + qpos[:, None] * s_lm + offs_r[None, :] * s_ld,
                 mask=row_ok[:, None] & (offs_r[None, :] < r), other=0.0)
    qr = tl.load(QR + b * s_rb + head[:, None] * s_rh + qpos[:, None] * s_rm + offs_dr[None, :] * s_rd,
                 mask=row_ok[:, None] & (offs_dr[None, :] < dr), other=0.0)
    if UPCAST:
        ql, qr = ql.to(tl.float32), qr.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    split = tl.program_id(2)
    lo = split * split_len
    hi = tl.minimum(T, lo + split_len)
    if CAUSAL:  # tokens after the last row's diagonal are hidden from every row of the tile
        hi = tl.minimum(hi, tl.max(tl.where(row_ok, qpos, 0)) + (T - Sq) + 1)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        c = tl.load(C + b * s_cb + offs_n[:, None] * s_cn + offs_r[None, :] * s_cd,
                    mask=(offs_n[:, None] < T) & (offs_r[None, :] < r), other=0.0)
        kr = tl.load(KR + b * s_kb + j * s_kh + offs_n[:, None] * s_kn + offs_dr[None, :] * s_kd,
                     mask=(offs_n[:, None] < T) & (offs_dr[None, :] < dr), other=0.0)
        if UPCAST:
            c, kr = c.to(tl.float32), kr.to(tl.float32)
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION) + tl.dot(qr, tl.trans(kr), input_precision=PRECISION)
        s = s * qk_scale  # log2 domain
        keep = row_ok[:, None] & (offs_n[None, :] < T)
        if HAS_KPM:
            keep = keep & (tl.load(KPM + b * s_pb + offs_n * s_pn, mask=offs_n < T, other=0) != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= qpos[:, None] + (T - Sq))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept token yet: exp2(-inf) = 0 anyway
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new
    acc = acc * tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)[:, None]
    tl.store(O + split * s_os + b * s_ob + head[:, None] * s_oh + qpos[:, None] * s_om + offs_r[None, :] * s_od,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_r[None, :] < r))
    if SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(LSE + split * s_es + b * s_eb + head * s_eh + qpos * s_em, lse, mask=row_ok)


def _combine(part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Σ_s w_s o_s / Σ_s w_s with w_s = 2^(lse_s − max lse): the splits' partial outputs ``[S, B, H, Sq, r]``
    as one softmax over all tokens (0 where no split kept a token)."""
    top = lse.amax(0)
    w = torch.exp2(lse - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # 0 for an empty split
    total = w.sum(0)
    out = (w[..., None] * part).sum(0) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return out


def head_table(rope_map: torch.Tensor, rope_heads: int) -> torch.Tensor:
    """``[R, G]`` int32: the query heads reading each RoPE key head (ValueError unless every one is read by G)."""
    h = rope_map.shape[0]
    rope_map = rope_map.long()
    if rope_map.dim() != 1 or (h and not 0 <= int(rope_map.min()) <= int(rope_map.max()) < rope_heads):
        raise ValueError(f"rope_map must give each of the {h} query heads one of the {rope_heads} RoPE key heads")
    counts = torch.bincount(rope_map, minlength=rope_heads)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"RoPE key heads read by unequal numbers of query heads ({counts.tolist()})")
    return torch.argsort(rope_map, stable=True).view(rope_heads, -1).to(torch.int32).contiguous()


def _check(q_lat, q_rope, c, k_rope, rope_map, key_padding_mask, heads=None):
    """(heads [R, G] int32: the query heads of each RoPE key head) after shape checks (ValueError)."""
    for name, t in (("q_lat", q_lat), ("q_rope", q_rope), ("c", c), ("k_rope", k_rope)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype != q_lat.dtype or t.device != q_lat.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q_lat is {q_lat.dtype} on {q_lat.device}")
    b, h, sq, r = q_lat.shape
    rr, t, dr = k_rope.shape[1:]
    if tuple(q_rope.shape) != (b, h, sq, dr) or tuple(c.shape) != (b, 1, t, r) or k_rope.shape[0] != b:
        raise ValueError(f"shapes q_lat {tuple(q_lat.shape)}, q_rope {tuple(q_rope.shape)}, c {tuple(c.shape)}, "
                         f"k_rope {tuple(k_rope.shape)}: expected [B, H, Sq, r], [B, H, Sq, dr], [B, 1, T, r], "
                         "[B, R, T, dr]")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, t)):
        raise ValueError(f"key_padding_mask must be a bool tensor [B, T] = {(b, t)}")
    if heads is not None:  # precomputed by head_table: no host sync per call
        if tuple(heads.shape) != (rr, h // rr) or heads.device != q_lat.device:
            raise ValueError(f"heads must be the [R, G] = {(rr, h // rr)} table of head_table on {q_lat.device}")
        return heads
    if rope_map.shape != (h,):
        raise ValueError(f"rope_map must give each of the {h} query heads one of the {rr} RoPE key heads")
    return head_table(rope_map.to(q_lat.device), rr)


def _splits(programs: int, tiles: int, device) -> int:
    """Token splits so that the GPU has about two programs per SM (decode: few rows, many tokens)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles // 4, triton.cdiv(2 * sms, programs)))


def mla_attention(q_lat, q_rope, c, k_rope, *, rope_map, scale: float, causal: bool = False,
                  key_padding_mask: Optional[torch.Tensor] = None, splits: Optional[int] = None,
                  heads: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``o_lat [B, H, Sq, r]`` = softmax(scale·(q_lat·cᵀ + q_rope·k_ropeᵀ) + mask) c, fp32 accumulation.

    q_lat ``[B, H, Sq, r]``, q_rope ``[B, H, Sq, dr]``, c ``[B, 1, T, r]``, k_rope ``[B, R, T, dr]``;
    ``rope_map [H]``: the RoPE key head of each query head (every RoPE head read by equally many).
    ``splits``: programs per row tile over the tokens, combined after (default: enough to fill the GPU);
    ``heads``: ``head_table(rope_map, R)`` computed once by a caller that decodes many steps."""
    heads = _check(q_lat, q_rope, c, k_rope, rope_map, key_padding_mask, heads)
    b, h, sq, r = q_lat.shape
    rr, t, dr = k_rope.shape[1:]
    out = torch.empty_like(q_lat)
    if out.numel() == 0 or t == 0:
        return out.zero_()
    interpreted = is_interpreted(_mla_kernel)
    block_r, block_dr = head_block(r), head_block(dr)
    wide = block_r + block_dr > 256
    block_m, block_n = (16, 16) if interpreted else ((32, 32) if wide else (64, 64))
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        s_pb, s_pn = kpm.stride()
    else:
        kpm, s_pb, s_pn = heads, 0, 0  # never read
    g = h // rr
    tiles = triton.cdiv(t, block_n)
    row_tiles = triton.cdiv(g * sq, block_m)
    n_split = min(tiles, max(1, int(splits))) if splits is not None else _splits(b * rr * row_tiles, tiles, out.device)
    split_len = triton.cdiv(tiles, n_split) * block_n
    n_split = triton.cdiv(t, split_len)  # none empty
    part = out[None] if n_split == 1 else torch.empty((n_split, *out.shape), dtype=torch.float32, device=out.device)
    lse = part if n_split == 1 else torch.empty(part.shape[:-1], dtype=torch.float32, device=out.device)
    _mla_kernel[(b * rr, row_tiles, n_split)](
        q_lat, q_rope, c, k_rope, heads, kpm, part, lse,
        *q_lat.stride(), *q_rope.stride(), c.stride(0), c.stride(2), c.stride(3), *k_rope.stride(),
        s_pb, s_pn, *part.stride(), *(lse.stride() if n_split > 1 else (0, 0, 0, 0)),
        rr, g, sq, t, r, dr, float(scale) * _LOG2E, split_len,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_DR=block_dr, CAUSAL=bool(causal),
        HAS_KPM=key_padding_mask is not None, SPLIT=n_split > 1, UPCAST=interpreted,
        PRECISION=dot_precision(q_lat.dtype), num_warps=8 if wide and not interpreted else 4,
        num_stages=2 if wide else 3)  # a wide latent tile (r = 512: 32 KB in bf16) is double-buffered, not triple
    return out if n_split == 1 else _combine(part, lse).to(out.dtype)


def mla_reference(q_lat, q_rope, c, k_rope, *, rope_map, scale: float, causal: bool = False,
                  key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch (fp32) of :func:`mla_attention`, same checks; rows with no kept token are 0."""
    _check(q_lat, q_rope, c, k_rope, rope_map, key_padding_mask)
    sq, t = q_lat.shape[2], c.shape[2]
    kr = k_rope.index_select(1, rope_map.to(k_rope.device).long()).float()
    s = (q_lat.float() @ c.float().transpose(-1, -2) + q_rope.float() @ kr.transpose(-1, -2)) * scale
    keep = torch.ones(sq, t, dtype=torch.bool, device=c.device)[None, None]
    if causal:
        keep = keep & (torch.arange(t, device=c.device)[None, :] <= torch.arange(sq, device=c.device)[:, None] + t - sq)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return (p @ c.float()).to(q_lat.dtype)


class LatentTritonSite(nn.Module):
    """A ``LatentAttention`` whose core runs in Triton; called like the op (``cache=`` included)."""

    def __init__(self, op):
        super().__init__()
        self.op, self.kind = op, "latent"
        if op.softcap:
            raise BackendError(f"site {op.info.name}: the tanh soft-cap of the scores (c={op.softcap:g}) is not in "
                               "the Triton MLA kernel; use backend='eager' or 'onnxruntime' for this model")

    info = property(lambda self: self.op.info)  # read by rewrite.hf_adapter.SiteAdapter

    def _heads(self, device) -> torch.Tensor:
        table = self.__dict__.get("_table")
        if table is None or table.device != device:
            try:
                table = self.__dict__["_table"] = head_table(self.op.rope_map.to(device), self.op.rope_heads)
            except ValueError as e:
                raise BackendError(f"site {self.op.info.name}: Triton MLA kernel refused its RoPE key map: {e}") from e
        return table

    def forward(self, x, kv=None, mask=None, *side, cache=None, is_causal: Optional[bool] = None):
        from .flash import attention_forward
        from .lowering import split_mask

        op = self.op
        if kv is not None:
            raise BackendError(f"site {op.info.name}: a latent attention site is self-attention only")
        q_nope, q_rope, c, kr = op.latent(x, *side)
        if cache is not None:
            c, kr = cache.update(c, kr)
        if mask is not None and mask.shape[-1] > c.shape[2]:
            mask = mask[..., :c.shape[2]]
        if mask is None:  # the causal rule bottom-right, as in LatentAttention with a cache
            pad, causal = None, bool(op.causal if is_causal is None else is_causal)
        else:
            pad, causal = split_mask(mask, x.shape[0], q_nope.shape[2], c.shape[2], op.causal, op.info.name)
        try:
            if c.shape[2] == q_nope.shape[2]:  # every token new (no cache, or a prompt): up-project K/V, flash kernel
                k = torch.cat([op._up(c, op.w_uk, op.b_uk), op._rope_keys(kr)], dim=-1)
                v = op._up(c, op.w_uv, op.b_uv)
                heads = torch.arange(op.q_heads, device=x.device)
                o = attention_forward(torch.cat([q_nope, q_rope], -1).contiguous(), k.contiguous(), v.contiguous(),
                                      k_map=heads, v_map=heads, scale=op.scale, causal=causal, key_padding_mask=pad)
                return op.merge(o)
            q_lat = (q_nope @ op.w_uk).contiguous()  # W_ukᵀ q_nope per head
            o_lat = mla_attention(q_lat, q_rope.contiguous(), c, kr, rope_map=op.rope_map, scale=op.scale,
                                  causal=causal, key_padding_mask=pad, heads=self._heads(x.device))
        except ValueError as e:
            raise BackendError(f"site {op.info.name}: Triton MLA kernel refused its inputs: {e}") from e
        o = o_lat @ op.w_uv.transpose(-1, -2)
        return op.merge(o if op.b_uv is None else o + op.b_uv[None, :, None, :])
