"""The canonical Attention op: one graph node per attention site, with explicit per-head state.

    out = Σ_i g_i · W_o^i · core(T_q(W_q^i x + b_q^i), T_k(W_k^{k_map[i]} kv + b_k), W_v^{v_map[i]} kv + b_v) + b_o

- ``wq [Hq, dh, D]``, ``wk [Hk, dh, Dkv]``, ``wv [Hv, dv, Dkv]``, ``wo [Do, Hq, dv]`` and their biases
  (``bo`` is never sliced);
- ``k_map``/``v_map [Hq]``: the key/value head each query head reads (identity for MHA,
  contiguous blocks for GQA, arbitrary for DHA);
- ``q_transform``/``k_transform``/``v_transform``: the part between the head split and the core (RoPE,
  q/k norms, a v norm), an extracted fx graph acting on ``[B, H, S, dh]`` for any H;
- ``score_fn``: ``None`` (softmax, run by SDPA) or a module replacing the core
  (clipped softmax, linear attention);
- score modifiers (``rewrite.score_mods``): ``s' = c·tanh(s/c) + M[:, bias_map]`` with ``softcap = c``
  (0: none) and ``bias_map [Hq]`` (None: the mask has no per-head rows), the row of the mask's head axis
  each query head reads, so per-head biases (ALiBi, relative position) follow the query heads; and
  attention sinks ``sink_logits [Hq]`` (None: none), a learned logit per head in every row's softmax;
- ``window``/``sinks [Hq]``: per-query-head attention span (``rewrite.spans``): a streaming head (w > 0)
  sees key j from position p iff j ≤ p and (p − j < w or j is among its first ``sinks`` real tokens); both
  None when every head is full (the fast path below is then untouched);
- ``head_gate``: ``None`` or a module giving per-head, per-token weights ``g [B, Hq, Sq]``
  (gated attention, MoH), or per feature ``g [B, Hq, Sq, dv]`` (a model's own output gate);
- ``weights``: ``None`` (the op owns ``wq..wo`` as Parameters) or a provider module whose
  ``forward()`` returns ``(wq, wk, wv, wo)``, built once per forward (shared matrix atoms, MASA).
  ``op.wq`` etc. still read as tensors; ``heads.rebuild`` turns them back into owned Parameters.

The eager path uses ``torch.nn.functional.scaled_dot_product_attention``; a mask that recognition saw
hide every later key (``info.causal_mask``) and that holds no padding on this call is passed as
``is_causal=True`` instead (the same function, without the hidden blocks).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .score_mods import append_sink, select_bias, softcapped_attention

__all__ = ["Attention", "HeadTransform", "SiteInfo", "hidden", "causal_keep", "DROP"]

WEIGHT_NAMES = ("wq", "wk", "wv", "wo")
DROP = -1e4  # additive mask entries at or below this hide their key (exp underflows to 0)


def hidden(mask: torch.Tensor) -> torch.Tensor:
    """Where an SDPA mask (bool keep, or additive) hides the key."""
    return ~mask if mask.dtype == torch.bool else mask <= DROP


def _tracing() -> bool:
    """Inside torch.export / torch.compile / jit tracing, where values cannot be inspected."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def only_causal(mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    """The mask hides exactly the keys after each query (no padding): SDPA's ``is_causal`` does the same.

    The verdict is kept on the mask tensor (per version), so the sites sharing one mask scan it once.
    """
    key = (mask._version, q_len, k_len)
    cached = getattr(mask, "_rewrite_only_causal", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    verdict = (q_len == k_len and mask.dim() >= 2 and tuple(mask.shape[-2:]) == (q_len, k_len)
               and bool((hidden(mask) == future_keys(q_len, mask.device)).all())
               and (mask.dtype == torch.bool or bool((mask[~hidden(mask)] == 0).all())))  # no score bias
    mask._rewrite_only_causal = (key, verdict)
    return verdict


def future_keys(length: int, device=None) -> torch.Tensor:
    """``[S, S]`` bool: True where key j comes after query i (j > i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def causal_keep(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """``[Sq, Sk]`` bool keep mask of causal attention when the queries are the *last* Sq of Sk positions
    (bottom-right aligned, as in decoding with a cache): query i sees keys j ≤ i + Sk − Sq."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


@dataclasses.dataclass
class SiteInfo:
    """What recognition learned about a site, kept for passes and reports."""

    name: str  # module path, e.g. "model.layers.0.self_attn"
    layout: str = "BSD"  # token layout of x and of the output: "BSD" or "SBD"
    rope: Optional[str] = None  # "rotate_half" | "interleaved" | "other" (read by execution) | None
    rotary_dims: int = 0
    qk_norm: bool = False
    cross: bool = False
    mask_kind: Optional[str] = None  # "bool" (True = keep) | "additive" | None
    causal_mask: bool = False  # the mask hides every later key (seen on example, resized and scrambled inputs)
    q_len: int = 0  # sequence lengths seen in the example inputs (for FLOP counts)
    kv_len: int = 0
    # where each weight came from in the original model, for writing checkpoints back:
    # field -> (parameter name, index tensor over its output rows / input columns, transposed)
    sources: dict = dataclasses.field(default_factory=dict)


class HeadTransform(nn.Module):
    """A per-head map ``[B, H, S, d] -> [B, H, S, d]`` taken from the original graph (RoPE, q/k norm).

    Wraps an fx GraphModule ``f(x, *side)``; the side inputs (cos, sin, ...) are graph inputs of the
    site. It holds no head count, so it works for any H; except ``heads``: it acts on all H·d features at
    once (a q/k norm over the whole projection, OLMo-2) and is exact only for that many heads.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, n_side: int, description: str = "",
                 heads: Optional[int] = None):
        super().__init__()
        self.fn = graph_module
        self.n_side = n_side
        self.description = description
        self.heads = heads

    def forward(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *side)


def _contiguous_groups(kv_map: torch.Tensor, n_kv: int) -> Optional[int]:
    """Group size g if ``kv_map[i] == i // g`` (HF repeat_kv order), else None."""
    hq = kv_map.numel()
    if n_kv == 0 or hq % n_kv:
        return None
    g = hq // n_kv
    expected = torch.arange(hq, device=kv_map.device) // g
    return g if torch.equal(kv_map, expected) else None


class Attention(nn.Module):
    """The canonical attention op (see the module docstring for the equation)."""

    def __init__(
        self,
        wq: torch.Tensor,
        wk: torch.Tensor,
        wv: torch.Tensor,
        wo: torch.Tensor,
        bq: Optional[torch.Tensor] = None,
        bk: Optional[torch.Tensor] = None,
        bv: Optional[torch.Tensor] = None,
        bo: Optional[torch.Tensor] = None,
        k_map: Optional[torch.Tensor] = None,
        v_map: Optional[torch.Tensor] = None,
        *,
        scale: float,
        causal: bool = False,
        info: Optional[SiteInfo] = None,
        q_transform: Optional[HeadTransform] = None,
        k_transform: Optional[HeadTransform] = None,
        v_transform: Optional[HeadTransform] = None,
        bias_map: Optional[torch.Tensor] = None,
        bias_heads: int = 0,
        softcap: float = 0.0,
        sink_logits: Optional[torch.Tensor] = None,
        window: Optional[torch.Tensor] = None,
        sinks: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        hq = wq.shape[0]
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(w.detach().clone()) for w in (wq, wk, wv, wo))
        for name, b in (("bq", bq), ("bk", bk), ("bv", bv), ("bo", bo)):
            setattr(self, name, None if b is None else nn.Parameter(b.detach().clone()))
        k_map = torch.arange(hq) if k_map is None else k_map
        v_map = k_map if v_map is None else v_map
        self.register_buffer("k_map", k_map.clone().long())
        self.register_buffer("v_map", v_map.clone().long())
        self.scale = float(scale)
        self.causal = bool(causal)
        self.info = info or SiteInfo(name="attention")
        self.q_transform = q_transform
        self.k_transform = k_transform
        self.v_transform = v_transform  # a per-head map of the values (Gemma-4's v norm), or None
        self.register_buffer("bias_map", None if bias_map is None else bias_map.clone().long())
        self.bias_heads = int(bias_heads or (0 if bias_map is None else bias_map.numel()))  # H₀ of the mask
        self.softcap = float(softcap)
        self.sink_logits = None if sink_logits is None else nn.Parameter(sink_logits.detach().clone())
        self.set_span(window, sinks)
        self.score_fn: Optional[nn.Module] = None
        self.head_gate: Optional[nn.Module] = None
        self.weights: Optional[nn.Module] = None
        self.replan()

    def use_weights(self, provider: nn.Module) -> None:
        """Take ``(wq, wk, wv, wo)`` from ``provider()`` instead of owned Parameters (which are dropped)."""
        for name in WEIGHT_NAMES:
            self._parameters.pop(name, None)
        self.weights = provider

    def __getattr__(self, name):
        if name in WEIGHT_NAMES:  # a provided weight, rebuilt on access
            provider = self.__dict__.get("_modules", {}).get("weights")
            if provider is not None:
                return provider()[WEIGHT_NAMES.index(name)]
        return super().__getattr__(name)

    def set_span(self, window=None, sinks=None) -> None:
        """Per-query-head ``window`` (0 = full) and ``sinks`` (ints or ``[Hq]``), checked by ``rewrite.spans``."""
        from .spans import check_span

        window, sinks = check_span(self.info.name, window, sinks, self.wq.shape[0])
        self.register_buffer("window", window)
        self.register_buffer("sinks", sinks)
        self.__dict__.pop("_plan", None)

    def _span_plan(self):
        """How the decode cache bounds the streaming KV heads (``rewrite.span_cache``), or None; kept per op."""
        if "_plan" not in self.__dict__:
            from .span_cache import span_plan

            self.__dict__["_plan"] = span_plan(self)
        return self.__dict__["_plan"]

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def q_heads(self) -> int:
        return self.wq.shape[0]

    @property
    def k_heads(self) -> int:
        return self.wk.shape[0]

    @property
    def v_heads(self) -> int:
        return self.wv.shape[0]

    @property
    def kv_heads(self) -> int:
        """KV heads cached per token (max of K and V heads; DHA may differ)."""
        return max(self.k_heads, self.v_heads)

    @property
    def head_dim(self) -> int:
        return self.wq.shape[1]

    @property
    def v_head_dim(self) -> int:
        return self.wv.shape[1]

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes the cache grows by per token: (Hk·dh + Hv·dv)·bytes; 0 for a recurrent (linear) site or a
        sliding-window + linear one (its cache is bounded: ``state_bytes``)."""
        if _bounded_cache(self.score_fn):
            return 0
        return (self.k_heads * self.head_dim + self.v_heads * self.v_head_dim) * dtype_bytes

    def state_bytes(self) -> int:
        """Bytes of a recurrent site's fixed-size state per sequence: P·(f·dv + f) fp32 values, P the distinct
        (key head, value head) pairs, f the features per head (dh, or a learned map's), plus for a sliding-window
        site the last W keys and values, W·(Hk·dh + Hv·dv) in the weights' dtype; 0 for softmax sites."""
        if not _bounded_cache(self.score_fn):
            return 0
        pairs = len(set(zip(self.k_map.tolist(), self.v_map.tolist())))
        f = getattr(self.score_fn, "feature_dim", 0) or self.head_dim  # features per head (a learned map's)
        window = getattr(self.score_fn, "window", 0) if getattr(self.score_fn, "windowed", False) else 0
        return pairs * (f * self.v_head_dim + f) * 4 + window * (
            self.k_heads * self.head_dim + self.v_heads * self.v_head_dim) * self.wk.element_size()

    def attn_flops(self, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> int:
        """Score and value matmuls for one sequence: 2·Sq·Sk·Hq·(dh + dv)."""
        q_len = q_len or self.info.q_len
        kv_len = kv_len or self.info.kv_len or q_len
        return 2 * q_len * kv_len * self.q_heads * (self.head_dim + self.v_head_dim)

    def replan(self) -> None:
        """Choose the cheapest way to expand K/V heads to query heads after the maps change."""
        self._k_group = _contiguous_groups(self.k_map, self.k_heads)
        self._v_group = _contiguous_groups(self.v_map, self.v_heads)
        self._bias_identity = self.bias_map is None or (self.bias_map.numel() == self.bias_heads and torch.equal(
            self.bias_map.cpu(), torch.arange(self.bias_heads)))

    # ---- the computation ----------------------------------------------------------------------
    def _split(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        h, d, dim = w.shape
        y = F.linear(x, w.reshape(h * d, dim), None if b is None else b.reshape(h * d))
        if self.info.layout == "SBD":  # (S, B, H*d) -> (B, H, S, d)
            return y.unflatten(-1, (h, d)).permute(1, 2, 0, 3)
        return y.unflatten(-1, (h, d)).transpose(1, 2)  # (B, S, H*d) -> (B, H, S, d)

    @staticmethod
    def _expand(t: torch.Tensor, kv_map: torch.Tensor, group: Optional[int]) -> torch.Tensor:
        if group == 1:
            return t
        if group is not None:  # (B, Hk, S, d) -> (B, Hk*g, S, d), HF repeat_kv order
            b, h, s, d = t.shape
            return t[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)
        return t.index_select(1, kv_map)

    def project_qkv(self, x, kv=None, *side, weights=None):
        """Per-head q, k, v (k and v still with their own head counts) after the head transforms."""
        kv = x if kv is None else kv
        wq, wk, wv = (weights or (self.wq, self.wk, self.wv))[:3]
        q = self._split(x, wq, self.bq)  # (B, Hq, Sq, dh)
        k = self._split(kv, wk, self.bk)  # (B, Hk, Sk, dh)
        v = self._split(kv, wv, self.bv)  # (B, Hv, Sk, dv)
        nq = self.q_transform.n_side if self.q_transform is not None else 0
        if self.q_transform is not None:
            q = self.q_transform(q, *side[:nq])
        nk = self.k_transform.n_side if self.k_transform is not None else 0
        if self.k_transform is not None:
            k = self.k_transform(k, *side[nq:nq + nk])
        if self.v_transform is not None:
            v = self.v_transform(v, *side[nq + nk:nq + nk + self.v_transform.n_side])
        return q, k, v

    def core(self, q, k, v, mask=None, causal: Optional[bool] = None):
        """softmax(c·tanh(q kᵀ·scale / c) + M[:, bias_map]) v over expanded heads, (B, Hq, Sq, dv); without a
        soft-cap (c = 0) the scores are q kᵀ·scale, and a mask without a head axis is shared by all heads.

        With fewer queries than keys (decoding with a cache) a causal site's queries are the last Sq
        positions: query i sees keys j ≤ i + Sk − Sq.
        """
        mask = select_bias(mask, self.bias_map, self._bias_identity)  # per-head bias rows of these heads
        if self.window is not None:  # streaming heads: one per-head mask (rewrite.spans)
            from .spans import span_mask

            mask = span_mask(self, mask, self.causal if causal is None else causal, q.shape[2], k.shape[2], q.device)
        causal = (self.causal if causal is None else causal) and mask is None
        if self.sink_logits is not None:  # one more key: score σ_h, value 0 (score_mods.append_sink)
            k, v, mask = append_sink(q, k, v, mask, self.sink_logits, causal)
            causal = False
        if self.score_fn is not None:  # score functions read the causal rule from op.causal
            return self.score_fn(_Causal(self) if causal and not self.causal else self, q, k, v, mask)
        if torch.onnx.is_in_onnx_export():  # one standard ONNX Attention node, same semantics as SDPA
            from rewrite.backends.onnx import attention_node
            return attention_node(self, q, k, v, mask)
        sq, sk = q.shape[2], k.shape[2]
        if (mask is not None and self.info.causal_mask and isinstance(mask, torch.Tensor) and not _tracing()
                and only_causal(mask, sq, sk)):
            mask, causal = None, True  # same function; SDPA then skips the hidden blocks
        if causal and sq != sk:  # SDPA's is_causal is top-left aligned: spell out the bottom-right rule
            mask, causal = (None if sq == 1 else causal_keep(sq, sk, q.device)), False
        if self.softcap:  # SDPA has no soft-cap: the scores are spelled out
            k = self._expand(k, self.k_map, self._k_group)
            v = self._expand(v, self.v_map, self._v_group)
            return softcapped_attention(q, k, v, mask, self.scale, self.softcap, causal)
        group = self._k_group if self._k_group == self._v_group else None
        if group and group > 1 and not _tracing():  # K/V stay at their own head count (no copies)
            return _grouped_attention(q, k, v, mask, causal, self.scale, group)
        if group is None and not _tracing() and _rows_fold(q, mask, causal, 64):  # arbitrary maps (DHA), decoding
            return _paired_attention(q, k, v, mask, self.scale, self.k_map, self.v_map)
        k = self._expand(k, self.k_map, self._k_group)
        v = self._expand(v, self.v_map, self._v_group)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)

    def _scores(self, q, k, v, mask, is_causal):
        if not is_causal or mask is not None or self.causal:
            return self.core(q, k, v, mask)
        return self.core(q, k, v, mask, causal=True)

    def merge(self, o: torch.Tensor, wo: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, Hq, Sq, dv) -> output projection in the site's token layout."""
        if self.info.layout == "SBD":
            o = o.permute(2, 0, 1, 3)  # (S, B, H, dv)
        else:
            o = o.transpose(1, 2)  # (B, S, H, dv)
        o = o.flatten(-2)
        wo = self.wo if wo is None else wo
        return F.linear(o, wo.reshape(wo.shape[0], -1), self.bo)

    def forward(self, x, kv=None, mask=None, *side, cache=None, is_causal: Optional[bool] = None):
        """The site's output; with ``cache`` (a ``rewrite.cache.LayerCache``) the new tokens' K/V, at this
        site's own head counts, are appended first and attention reads every cached token. A recurrent
        score function (linear attention) updates its fixed-size state instead. ``is_causal`` overrides
        ``self.causal`` when there is no mask (a model that skips its causal mask, as transformers does)."""
        weights = self.weights() if self.weights is not None else None  # once per forward
        q, k, v = self.project_qkv(x, kv, *side, weights=weights)
        if cache is not None and _bounded_cache(self.score_fn):  # linear state (and a window of K/V)
            o = self.score_fn.step(self, q, k, v, mask, cache)
        elif cache is not None and self.window is not None and self.score_fn is None and self._span_plan():
            from .span_cache import span_cached_attention  # streaming KV heads keep sinks + window slots

            o = span_cached_attention(self, q, k, v, mask, cache, self._span_plan())
        else:
            if cache is not None:
                k, v = cache.update(k, v)  # (B, Hk, past + Sq, dh), (B, Hv, past + Sq, dv)
            if mask is not None and mask.shape[-1] > k.shape[2]:
                mask = mask[..., :k.shape[2]]  # a static cache's mask may be longer than the keys so far
            o = self._scores(q, k, v, mask, is_causal)
        if self.head_gate is not None:  # g [B, Hq, Sq] per head, or [B, Hq, Sq, dv] per feature
            g = self.head_gate(self, x, q)
            o = o * (g.unsqueeze(-1) if g.dim() == 3 else g)
        return self.merge(o, None if weights is None else weights[3])

    def extra_repr(self) -> str:
        return (f"{self.info.name}: q_heads={self.q_heads}, k_heads={self.k_heads}, "
                f"v_heads={self.v_heads}, head_dim={self.head_dim}, scale={self.scale:.4g}, "
                f"causal={self.causal}, layout={self.info.layout}, rope={self.info.rope}"
                + (f", bias_heads={self.bias_heads}" if self.bias_map is not None else "")
                + (f", softcap={self.softcap:g}" if self.softcap else "")
                + (", sinks" if self.sink_logits is not None else "")
                + (f", window={self.window.tolist()}, sinks={self.sinks.tolist()}" if self.window is not None else ""))


def _bounded_cache(score_fn) -> bool:
    """The score function decodes from its own bounded cache (``step``): linear attention's state, or the
    sliding-window + linear hybrid's window and state."""
    return bool(getattr(score_fn, "recurrent", False) or getattr(score_fn, "windowed", False))


def _rows_fold(q, mask, causal: bool, limit: int) -> bool:
    """Few queries and a mask shared by all heads: query heads can become query rows."""
    return (q.shape[2] * q.shape[1] <= limit and not causal
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)))


def _fold_mask(mask, rows: int, sq: int, sk: int):
    """A (B, 1, Sq, Sk) mask repeated for ``rows`` heads folded into the query rows: (B, 1, rows·Sq, Sk)."""
    if mask is None:
        return None
    mb = mask.shape[0]
    return mask.expand(mb, 1, sq, sk).unsqueeze(2).expand(mb, 1, rows, sq, sk).reshape(mb, 1, rows * sq, sk)


def _paired_attention(q, k, v, mask, scale: float, k_map, v_map) -> torch.Tensor:
    """Query heads grouped by the (key head, value head) pair they read, each group one SDPA call over that
    pair with its heads folded into query rows: no K/V copies for arbitrary maps (DHA)."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    out = q.new_empty(b, hq, sq, v.shape[-1])
    pairs = {}
    for i, pair in enumerate(zip(k_map.tolist(), v_map.tolist())):
        pairs.setdefault(pair, []).append(i)
    for (kh, vh), heads in pairs.items():
        idx = torch.tensor(heads, device=q.device)
        rows = q.index_select(1, idx).reshape(b, 1, len(heads) * sq, d)
        o = F.scaled_dot_product_attention(rows, k[:, kh:kh + 1], v[:, vh:vh + 1],
                                           attn_mask=_fold_mask(mask, len(heads), sq, sk), scale=scale)
        out[:, idx] = o.reshape(b, len(heads), sq, -1)
    return out


def _grouped_attention(q, k, v, mask, causal: bool, scale: float, group: int) -> torch.Tensor:
    """SDPA with query head i reading KV head i // group, without copying K/V up to the query heads.

    A few queries (decoding) fold each group's query heads into query rows, (B, Hk, g·Sq, d), when the
    mask is the same for every head; otherwise SDPA's ``enable_gqa``.
    """
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    if _rows_fold(q, mask, causal, 64 * hk):
        rows = q.reshape(b, hk, group * sq, d)  # (B, Hk, g·Sq, d): rows (member j, query i)
        o = F.scaled_dot_product_attention(rows, k, v, attn_mask=_fold_mask(mask, group, sq, sk), scale=scale)
        return o.reshape(b, hq, sq, v.shape[-1])  # (B, Hk, g·Sq, dv) -> (B, Hq, Sq, dv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


class _Causal:
    """``op`` seen with ``causal=True`` (for score functions when the model passes no causal mask)."""

    def __init__(self, op):
        self._op = op
        self.causal = True

    def __getattr__(self, name):
        return getattr(self._op, name)
