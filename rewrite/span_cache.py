"""A bounded decode cache for sites with streaming heads (``rewrite.spans``): full KV heads keep every token,
streaming KV heads keep s + w slots.

A KV head is *streaming* when every query head reading it has a window (the ``local-heads`` pass decides KV
groups together); it then stores, per row, the first s real tokens in s sink slots and the last w tokens in a ring
of w slots (token at position t in slot s + t mod w), s = max sinks and w = max window of its readers. A token
leaving the ring becomes a sink while its row has fewer than s real sinks, so the sinks are the first s real
tokens, as in the mask rule. Attention of a streaming query head h at position p reads the slots and the new
tokens, each with its position, under the site's own mask columns at those positions and

    keep(j) = pos_j ≤ p and (sink slot with index < s_h  or  p − pos_j < w_h  or  rank_j < s_h),

which is exactly the masked full-cache computation (``Attention.core`` with the span mask). Stored bytes per
layer: B·(H_full·T + H_stream·(s + w))·(d_k + d_v)·bytes, T the tokens so far.

Sites whose keys and values use different head maps (DHA) or that have no purely streaming KV head decode with
the ordinary cache and the span mask (exact, not bounded).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

from .ir import causal_keep
from .score_mods import select_bias, softcapped_attention
from .spans import real_key_rows

__all__ = ["SpanPlan", "span_plan", "SpanLayer", "span_cached_attention"]


@dataclasses.dataclass
class SpanPlan:
    full_kv: torch.Tensor  # KV heads kept whole
    stream_kv: torch.Tensor  # KV heads kept in s + w slots
    full_q: torch.Tensor  # query heads reading full KV heads, and the KV index (into full_kv) each reads
    full_map: torch.Tensor
    stream_q: torch.Tensor
    stream_map: torch.Tensor
    window: int
    sinks: int


def span_plan(op) -> Optional[SpanPlan]:
    """How ``op`` splits its KV heads, or None when no KV head can be bounded (see the module docstring)."""
    if op.window is None or op.k_heads != op.v_heads or not torch.equal(op.k_map, op.v_map):
        return None
    w, s, kmap = op.window.cpu(), op.sinks.cpu(), op.k_map.cpu()
    stream = [h for h in range(op.k_heads) if bool((w[kmap == h] > 0).all()) and bool((kmap == h).any())]
    if not stream:
        return None
    full = [h for h in range(op.k_heads) if h not in stream]
    sq = [i for i in range(op.q_heads) if int(kmap[i]) in stream]
    fq = [i for i in range(op.q_heads) if int(kmap[i]) not in stream]
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return SpanPlan(t(full), t(stream), t(fq), t([full.index(int(kmap[i])) for i in fq]), t(sq),
                    t([stream.index(int(kmap[i])) for i in sq]), int(w[sq].max()), int(s[sq].max()))


class SpanLayer(DynamicLayer):
    """One layer's cache: ``keys``/``values`` of the full KV heads (appended) and the streaming slots."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.tokens = 0
        self.slot_k = self.slot_v = self.slot_pos = self.sink_count = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.tokens

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.tokens + query_length, 0  # the mask covers every position: slots read their columns

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.slot_k, self.slot_v)
                   if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a bounded (streaming-head) cache cannot be cropped (assisted decoding needs a full cache)")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for name in ("keys", "values", "slot_k", "slot_v", "slot_pos", "sink_count"):
            t = getattr(self, name)
            if t is not None and t.numel():
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self.tokens = 0
        self.slot_k = self.slot_v = self.slot_pos = self.sink_count = None

    # ---- the two stores --------------------------------------------------------------------------
    def append_full(self, k, v):
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys, self.values = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        return self.keys, self.values

    def slots(self, b, h, dk, dv, plan: SpanPlan, like: torch.Tensor):
        if self.slot_k is None:
            n = plan.sinks + plan.window
            self.slot_k = like.new_zeros(b, h, n, dk)
            self.slot_v = like.new_zeros(b, h, n, dv)
            self.slot_pos = torch.full((b, n), -1, dtype=torch.long, device=like.device)
            self.sink_count = torch.zeros(b, dtype=torch.long, device=like.device)
        return self.slot_k, self.slot_v, self.slot_pos

    def store(self, k_new, v_new, plan: SpanPlan, real: torch.Tensor) -> None:
        """After attention: promote tokens leaving the ring to sinks, then write the newest w tokens into it."""
        s, w = plan.sinks, plan.window
        t0, sq = self.tokens, k_new.shape[2]
        total = t0 + sq
        ring_pos = self.slot_pos[:, s:]  # [B, w]
        new_pos = torch.arange(t0, total, device=k_new.device)
        if s:
            for b in range(k_new.shape[0]):  # leaving: ring slots and new tokens older than total − w
                need = s - int(self.sink_count[b])
                if need <= 0:
                    continue
                old = ring_pos[b]
                cand = [(int(p), "ring", j) for j, p in enumerate(old.tolist()) if 0 <= p < total - w]
                cand += [(t0 + j, "new", j) for j in range(max(0, min(sq, total - w - t0)))]
                cand = [c for c in sorted(cand) if bool(real[b, c[0]])][:need]
                for p, where, j in cand:
                    c = int(self.sink_count[b])
                    src_k, src_v = ((self.slot_k[b, :, s + j], self.slot_v[b, :, s + j]) if where == "ring"
                                    else (k_new[b, :, j], v_new[b, :, j]))
                    self.slot_k[b, :, c], self.slot_v[b, :, c] = src_k, src_v
                    self.slot_pos[b, c] = p
                    self.sink_count[b] += 1
        keep = min(sq, w)
        slot = s + new_pos[sq - keep:] % w
        self.slot_k[:, :, slot] = k_new[:, :, sq - keep:]
        self.slot_v[:, :, slot] = v_new[:, :, sq - keep:]
        self.slot_pos[:, slot] = new_pos[sq - keep:]
        self.tokens = total


def _attend(op, q, k, v, kv_map, mask):
    """softmax(c·tanh(q kᵀ·scale / c) + mask) v with query head i reading ``kv_map[i]``; ``mask`` per head.
    K/V are not copied up to the query heads when the map is the identity or contiguous groups."""
    from .ir import _contiguous_groups

    group = _contiguous_groups(kv_map, k.shape[1])
    if op.softcap or group is None:
        k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)
        group = 1
    if op.softcap:
        return softcapped_attention(q, k, v, mask, op.scale, op.softcap, False)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=op.scale,
                                                            enable_gqa=group > 1)


def _keep_into(mask, keep):
    """The site's mask values where ``keep``, hidden elsewhere (bool or additive)."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device))


def span_cached_attention(op, q, k, v, mask, cache, plan: SpanPlan):
    """``(B, Hq, Sq, dv)`` of ``op`` reading and extending its ``SpanLayer`` in ``cache`` (a LayerCache)."""
    layer = cache.own_layer(SpanLayer)
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    b, sq = q.shape[0], q.shape[2]
    t0 = layer.tokens
    total = t0 + sq
    mask = select_bias(mask, op.bias_map, op._bias_identity)
    if mask is not None:
        mask = mask[..., :total]
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    real = real_key_rows(mask, total)
    real = torch.ones(b, total, dtype=torch.bool, device=q.device) if real is None else real.expand(b, total)
    out = q.new_empty(b, op.q_heads, sq, v.shape[-1])
    dev = q.device
    if plan.full_q.numel():  # full KV heads: the ordinary cache, with the span mask of any windowed reader
        fk, fv = layer.append_full(k[:, plan.full_kv.to(dev)], v[:, plan.full_kv.to(dev)])
        from .spans import masked_span

        fq = plan.full_q.to(dev)
        fmask = mask if mask is None or mask.shape[1] == 1 else mask.index_select(1, fq)
        if bool((op.window[fq] > 0).any()):
            fmask = masked_span(op.window[fq], op.sinks[fq], fmask, True, sq, total, dev)
        elif fmask is None:
            fmask = None if sq == 1 else causal_keep(sq, total, dev)
        out[:, fq] = _attend(op, q[:, fq], fk, fv, plan.full_map.to(dev), fmask)
    sk_new, sv_new = k[:, plan.stream_kv.to(dev)], v[:, plan.stream_kv.to(dev)]
    slot_k, slot_v, slot_pos = layer.slots(b, sk_new.shape[1], sk_new.shape[-1], sv_new.shape[-1], plan, q)
    sq_heads = plan.stream_q.to(dev)
    w_h, s_h = op.window[sq_heads].to(dev), op.sinks[sq_heads].to(dev)
    if sq == 1 and bool((w_h == plan.window).all()):
        out[:, sq_heads] = _decode_step(op, q[:, sq_heads], sk_new, sv_new, layer, plan, s_h, mask, real)
        return out
    s = plan.sinks
    new_pos = torch.arange(t0, total, device=dev)
    pos = torch.cat([slot_pos, new_pos.expand(b, sq)], dim=1)  # [B, N]
    valid = pos >= 0
    idx = pos.clamp_min(0)
    pos_real = real.gather(1, idx) & valid
    ring_pos = slot_pos[:, s:]
    ring_real = real.gather(1, ring_pos.clamp_min(0)) & (ring_pos >= 0)
    before = (ring_pos[:, None, :] < ring_pos[:, :, None]) & ring_real[:, None, :]  # ring j' before ring j
    rank = torch.cat([torch.arange(s, device=dev).expand(b, s),
                      layer.sink_count[:, None] + before.sum(-1),
                      layer.sink_count[:, None] + ring_real.sum(-1, keepdim=True)
                      + real[:, t0:].long().cumsum(-1) - real[:, t0:].long()], dim=1)  # [B, N]
    is_sink = torch.zeros(pos.shape[1], dtype=torch.bool, device=dev)
    is_sink[:s] = True
    p = new_pos[:, None]  # [Sq, 1]
    dist = p[None] - pos[:, None, :]  # [B, Sq, N]
    seen = valid[:, None, :] & (dist >= 0) & pos_real[:, None, :]
    near = (dist[:, None] < w_h[None, :, None, None]) & ~is_sink  # ring/new within the head's window
    first = rank[:, None, None, :] < s_h[None, :, None, None]
    keep = seen[:, None] & (near | first)  # [B, Hs, Sq, N]
    keys = torch.cat([slot_k, sk_new], dim=2)
    values = torch.cat([slot_v, sv_new], dim=2)
    out[:, sq_heads] = _attend(op, q[:, sq_heads], keys, values, plan.stream_map.to(dev),
                               _slot_mask(mask, keep, idx, sq_heads))
    layer.store(sk_new, sv_new, plan, real)
    return out


def _slot_mask(mask, keep, idx, heads):
    """``keep [B, Hs, Sq, N]`` with the site's mask values at the entries' positions ``idx [B, N]`` (bias, padding)."""
    if mask is None:
        return keep
    m = mask if mask.shape[1] == 1 else mask.index_select(1, heads)
    b, _, sq, n = keep.shape
    m = m.expand(b, m.shape[1], sq, m.shape[-1]).gather(-1, idx[:, None, None, :].expand(b, m.shape[1], sq, n))
    return _keep_into(m, keep)


def _decode_step(op, q, k_new, v_new, layer: SpanLayer, plan: SpanPlan, s_h, mask, real):
    """One new token, every streaming head with the full ring: store first (the token leaving the ring is
    outside every window, so it matters only as a sink), then attend over the s + w slots, no copies."""
    layer.store(k_new, v_new, plan, real)
    pos = layer.slot_pos  # [B, s + w]
    idx = pos.clamp_min(0)
    live = (pos >= 0) & real.gather(1, idx)
    sink_ok = torch.ones(pos.shape[1], len(s_h), dtype=torch.bool, device=pos.device)
    sink_ok[:plan.sinks] = torch.arange(plan.sinks, device=pos.device)[:, None] < s_h[None, :]  # [s + w, Hs]
    keep = (live[:, None, :] & sink_ok.T[None])[:, :, None, :]  # [B, Hs, 1, s + w]
    return _attend(op, q, layer.slot_k, layer.slot_v, plan.stream_map.to(q.device),
                   _slot_mask(mask, keep, idx, plan.stream_q.to(q.device)))
