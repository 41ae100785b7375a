"""Multi-head latent attention (MLA; DeepSeek-V2/V3) as a form of the canonical op.

    q_i   = W_q^i · ñ_q(W_dq x + b_dq) + b_q^i         (ñ_q = q_norm; without W_dq, q_i = W_q^i x + b_q^i)
    q_i   = [q_i^nope ; q_i^rope],  q_i^rope ← R_q(q_i^rope)                  (d_nope + d_rope per head)
    c     = ñ_kv(W_dkv x + b_dkv)                                             (the latent, rank r: cached)
    k_j^r = R_k(W_kr^j x + b_kr^j)                                            (j < rope_heads: cached)
    k_i   = [W_uk^i c + b_uk^i ; k^r_{rope_map[i]}],   v_i = W_uv^i c + b_uv^i
    out   = Σ_i W_o^i · softmax(q_i k_iᵀ · scale + M) v_i + b_o

- ``w_q [H, d_nope + d_rope, Din]`` (Din = D, or the query rank with ``w_dq [rq, D]``), ``w_dkv [r, D]``,
  ``w_kr [R, d_rope, D]``, ``w_uk [H, d_nope, r]``, ``w_uv [H, dv, r]``, ``wo [Do, H, dv]`` and biases;
- ``q_norm``/``kv_norm``: extracted fx graphs on ``[B, S, rq]`` / ``[B, S, r]`` (RMSNorm), or None;
- ``q_rope``/``k_rope``: ``HeadTransform`` on ``[B, H, S, d_rope]`` / ``[B, R, S, d_rope]`` (the key's may take
  ``[B, S, d_rope]`` and give ``[B, 1, S, d_rope]``, as DeepSeek's graph does);
- ``rope_map [H]``: the RoPE key head each query head reads (R = 1 for DeepSeek and after
  ``mla{method=transmla}``; R = KV heads after ``mla{method=mha2mla}``).

The cache holds ``c`` and ``k^r``, (r + R·d_rope) values per token. With a cache the absorbed form runs, so no
per-head key or value is built for cached tokens:

    s_i = (W_uk^iᵀ q_i^nope)·c + q_i^rope·k^r + q_i^nope·b_uk^i,   o_i = W_uv^i (softmax(s_i·scale + M) c) + b_uv^i

Head-count passes do not apply (``wq``/``wk``/``wv`` raise ``FixedHeads``, so they skip the site with its name).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ir import Attention, SiteInfo, causal_keep, hidden

__all__ = ["LatentAttention", "is_latent"]

REFUSAL = ("is multi-head latent attention (keys and values are up-projected from a shared latent); "
           "this pass does not apply to it")


def is_latent(op) -> bool:
    return isinstance(op, LatentAttention)


def _param(t: Optional[torch.Tensor]):
    return None if t is None else nn.Parameter(t.detach().clone())


class LatentAttention(Attention):
    """MLA: see the module docstring for the equations."""

    def __init__(self, *, w_q, w_dkv, w_kr, w_uk, w_uv, wo, scale: float, causal: bool = False,
                 info: Optional[SiteInfo] = None, w_dq=None, b_dq=None, q_norm=None, b_q=None, b_dkv=None,
                 kv_norm=None, b_kr=None, b_uk=None, b_uv=None, bo=None, q_rope=None, k_rope=None,
                 rope_map: Optional[torch.Tensor] = None, softcap: float = 0.0):
        nn.Module.__init__(self)
        h = w_q.shape[0]
        for name, t in (("w_q", w_q), ("w_dkv", w_dkv), ("w_kr", w_kr), ("w_uk", w_uk), ("w_uv", w_uv),
                        ("wo", wo), ("w_dq", w_dq), ("b_dq", b_dq), ("b_q", b_q), ("b_dkv", b_dkv), ("b_kr", b_kr),
                        ("b_uk", b_uk), ("b_uv", b_uv), ("bo", bo)):
            setattr(self, name, _param(t))
        self.q_norm, self.kv_norm, self.q_rope, self.k_rope = q_norm, kv_norm, q_rope, k_rope
        rope_map = torch.zeros(h, dtype=torch.long) if rope_map is None else rope_map
        self.register_buffer("rope_map", rope_map.clone().long())
        self.register_buffer("k_map", torch.arange(h))
        self.register_buffer("v_map", torch.arange(h))
        self.register_buffer("bias_map", None)
        self.register_buffer("window", None)  # every head full (no span, rewrite.spans)
        self.register_buffer("sinks", None)
        self.sink_logits = None  # no attention sinks (score_mods.append_sink)
        self.bias_heads, self.softcap = 0, float(softcap)
        self.scale, self.causal = float(scale), bool(causal)
        self.info = info or SiteInfo(name="attention")
        self.q_transform = self.k_transform = self.v_transform = None
        self.score_fn = self.head_gate = self.weights = None
        self.replan()

    # ---- what head-count passes would read: refused by name ------------------------------------
    def replan(self) -> None:  # keys and values are built per query head
        self._k_group = self._v_group = 1
        self._bias_identity = True

    def _refuse(self):
        from .heads import FixedHeads
        raise FixedHeads(f"{self.info.name} {REFUSAL}")

    wq = property(lambda self: self._refuse())
    wk = property(lambda self: self._refuse())
    wv = property(lambda self: self._refuse())
    bq = property(lambda self: self._refuse())
    bk = property(lambda self: self._refuse())
    bv = property(lambda self: self._refuse())

    # ---- shape facts ---------------------------------------------------------------------------
    @property
    def q_heads(self) -> int:
        return self.w_q.shape[0]

    @property
    def rope_heads(self) -> int:
        return self.w_kr.shape[0]

    @property
    def k_heads(self) -> int:  # cached key groups: the RoPE key heads (the latent is shared)
        return self.rope_heads

    v_heads = k_heads
    kv_heads = k_heads

    @property
    def kv_rank(self) -> int:
        return self.w_dkv.shape[0]

    @property
    def rope_dim(self) -> int:
        return self.w_kr.shape[1]

    @property
    def nope_dim(self) -> int:
        return self.w_uk.shape[1]

    @property
    def head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def v_head_dim(self) -> int:
        return self.w_uv.shape[1]

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """(r + R·d_rope)·bytes: the latent and the RoPE keys."""
        return (self.kv_rank + self.rope_heads * self.rope_dim) * dtype_bytes

    def state_bytes(self) -> int:
        return 0

    # ---- the computation -----------------------------------------------------------------------
    @staticmethod
    def _heads(y: torch.Tensor, h: int, d: int) -> torch.Tensor:  # (B, S, H·d) -> (B, H, S, d)
        return y.unflatten(-1, (h, d)).transpose(1, 2)

    def latent(self, x, *side):
        """(q_nope [B, H, S, dn], q_rope [B, H, S, dr], c [B, 1, S, r], k_rope [B, R, S, dr])."""
        nq = self.q_rope.n_side if self.q_rope is not None else 0
        xq = x
        if self.w_dq is not None:
            xq = F.linear(x, self.w_dq, self.b_dq)
            xq = self.q_norm(xq) if self.q_norm is not None else xq
        h, dqk, din = self.w_q.shape
        q = self._heads(F.linear(xq, self.w_q.reshape(h * dqk, din), None if self.b_q is None else self.b_q.reshape(-1)),
                        h, dqk)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if self.q_rope is not None:
            q_rope = self.q_rope(q_rope, *side[:nq])
        c = F.linear(x, self.w_dkv, self.b_dkv)
        c = (self.kv_norm(c) if self.kv_norm is not None else c).unsqueeze(1)
        r, dr, d = self.w_kr.shape
        kr = F.linear(x, self.w_kr.reshape(r * dr, d), None if self.b_kr is None else self.b_kr.reshape(-1))
        kr = self._heads(kr, r, dr)  # (B, R, S, dr)
        if self.k_rope is not None:
            kr = self.k_rope(kr, *side[nq:nq + self.k_rope.n_side])
            kr = kr if kr.dim() == 4 else kr.unsqueeze(1)
        return q_nope, q_rope, c, kr

    def _rope_keys(self, kr):  # (B, R, S, dr) -> (B, H, S, dr), a view when R = 1
        return kr.index_select(1, self.rope_map) if self.rope_heads > 1 else kr.expand(-1, self.q_heads, -1, -1)

    def _up(self, c, w, b):  # (B, 1, S, r) -> (B, H, S, d)
        y = torch.einsum("bzsr,hdr->bhsd", c, w)
        return y if b is None else y + b[None, :, None, :]

    def forward(self, x, kv=None, mask=None, *side, cache=None, is_causal: Optional[bool] = None):
        """The site's output; with ``cache`` the latent and the RoPE keys are appended (``LayerCache.update``) and
        the absorbed form reads every cached token."""
        if kv is not None:
            raise ValueError(f"{self.info.name}: a latent attention site is self-attention only")
        q_nope, q_rope, c, kr = self.latent(x, *side)
        if cache is not None:
            c, kr = cache.update(c, kr)  # (B, 1, past + Sq, r), (B, R, past + Sq, dr)
        if mask is not None and mask.shape[-1] > c.shape[2]:
            mask = mask[..., :c.shape[2]]
        if cache is not None:
            causal = (self.causal if is_causal is None else is_causal) and mask is None
            o = self.absorbed(q_nope, q_rope, c, kr, mask, causal)
        else:
            k = torch.cat([self._up(c, self.w_uk, self.b_uk), self._rope_keys(kr)], dim=-1)
            v = self._up(c, self.w_uv, self.b_uv)
            o = self._scores(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, is_causal)
        return self.merge(o)

    def absorbed(self, q_nope, q_rope, c, kr, mask, causal: bool) -> torch.Tensor:
        """softmax(((W_ukᵀ q_nope)·c + q_rope·k^r + q_nope·b_uk)·scale + M) c, up-projected by W_uv: (B, H, Sq, dv)."""
        # batched matmuls (ONNX MatMul), c and a single RoPE key head broadcast over the query heads
        q_lat = q_nope @ self.w_uk  # (B, H, Sq, r)
        s = q_lat @ c.transpose(-1, -2)
        s = s + q_rope @ (kr if self.rope_heads == 1 else self._rope_keys(kr)).transpose(-1, -2)
        if self.b_uk is not None:
            s = s + q_nope @ self.b_uk[:, :, None]
        s = s * self.scale
        if self.softcap:
            s = self.softcap * torch.tanh(s / self.softcap)
        sq, sk = s.shape[-2:]
        if causal:
            mask = causal_keep(sq, sk, s.device)
        if mask is not None:
            # the lowest finite score, not -inf: a row with every key hidden (padding) stays finite, as in SDPA
            s = s.masked_fill(hidden(mask), torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
        p = torch.softmax(s.float(), dim=-1).to(c.dtype)
        o = (p @ c) @ self.w_uv.transpose(-1, -2)
        return o if self.b_uv is None else o + self.b_uv[None, :, None, :]

    def extra_repr(self) -> str:
        return (f"{self.info.name}: latent, q_heads={self.q_heads}, kv_rank={self.kv_rank}, "
                f"rope_heads={self.rope_heads}, nope_dim={self.nope_dim}, rope_dim={self.rope_dim}, "
                f"v_head_dim={self.v_head_dim}, q_rank={0 if self.w_dq is None else self.w_dq.shape[0]}, "
                f"scale={self.scale:.4g}, causal={self.causal}")
