"""What a canonical op caches while decoding, in transformers' own ``Cache`` objects.

- ``LayerCache(cache, layer_idx)``: one layer of a ``transformers`` Cache (``DynamicCache``, ``StaticCache``, ...)
  as a site sees it. ``update(k, v)`` appends the new tokens' K/V at the site's *own* head counts
  (``k_heads``/``v_heads``), so layers may differ (DHA, global pruning); ``state_layer()`` gives the layer a
  recurrent score function (linear attention) keeps its state in, ``own_layer(kind)`` any such layer class.
- ``LinearStateLayer``: a ``DynamicLayer`` whose "keys" are S = Σ_j φ(k_j)ᵀ v_j ``[B, P, d, dv]`` and whose
  "values" are z = Σ_j φ(k_j) ``[B, P, d]`` (P key/value head pairs); it counts the tokens it absorbed, so
  ``get_seq_length`` and mask sizes stay right while its size does not grow with the sequence. Beam search
  reordering and batch selection act on the state like on keys.
- ``WindowStateLayer``: the sliding-window + linear hybrid's (``lit{window=W}``, ``rewrite.window_linear``) cache:
  the last W keys ``[B, Hk, W, dh]`` and values ``[B, Hv, W, dv]`` at the site's head counts plus the state
  (S, z) of the tokens that left the window; bounded, it counts the tokens like ``LinearStateLayer``.
- ``cache_bytes(cache)``: bytes held per layer, measured from the cached tensors (``nbytes()`` of a layer that
  has one: the bounded streaming-head layer of ``rewrite.span_cache``).
"""
from __future__ import annotations

from transformers.cache_utils import DynamicLayer

__all__ = ["LayerCache", "LinearStateLayer", "WindowStateLayer", "cache_bytes"]


class LinearStateLayer(DynamicLayer):
    """Linear attention's fixed-size state (S, z) and the number of tokens folded into it."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a linear-attention layer keeps a state, not keys and values; use absorb()")

    def absorb(self, s, z, tokens: int) -> None:
        """Replace the state by ``(s, z)`` after ``tokens`` more tokens."""
        if not self.is_initialized:
            self.lazy_initialization(s, z)
        self.keys, self.values = s, z
        self.tokens += int(tokens)

    def state(self):
        """(S, z), or (None, None) before the first token."""
        return (self.keys, self.values) if self.tokens else (None, None)

    def get_seq_length(self) -> int:
        return self.tokens

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a linear-attention state cannot be cropped (assisted decoding needs a KV cache)")


class WindowStateLayer(LinearStateLayer):
    """The last W keys/values (``window()``) and the linear state (S, z) of the tokens older than them."""

    STORES = ("keys", "values", "win_k", "win_v")

    def __init__(self, **kwargs):
        super().__init__()
        self.win_k = self.win_v = None

    def window(self):
        """(keys, values) of the last W tokens, or (None, None) before the first token."""
        return self.win_k, self.win_v

    def state(self):
        """(S, z) of the tokens that left the window, or (None, None) while none has."""
        return self.keys, self.values

    def absorb_window(self, k, v, s, z, tokens: int) -> None:
        """Keep ``k``/``v`` as the window and ``(s, z)`` (None: empty) as the state after ``tokens`` more tokens."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self.win_k, self.win_v, self.keys, self.values = k, v, s, z
        self.tokens += int(tokens)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stores().values())

    def _stores(self) -> dict:
        return {n: getattr(self, n) for n in self.STORES if getattr(self, n) is not None}

    def reorder_cache(self, beam_idx) -> None:
        for n, t in self._stores().items():
            setattr(self, n, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for n, t in self._stores().items():
            setattr(self, n, t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        for n, t in self._stores().items():
            setattr(self, n, t[indices, ...])

    def reset(self) -> None:
        super().reset()
        self.win_k = self.win_v = None


class LayerCache:
    """One layer of a transformers ``Cache``, seen from the site that owns it."""

    def __init__(self, cache, layer_idx: int):
        self.cache, self.layer_idx = cache, int(layer_idx)

    def update(self, k, v):
        """Append ``k [B, Hk, Sq, dh]``, ``v [B, Hv, Sq, dv]``; all cached keys and values of this layer.

        A preallocated (static) layer returns only the slots filled so far, so a causal site without a mask
        never reads the empty tail."""
        keys, values = self.cache.update(k, v, self.layer_idx)
        filled = int(self.cache.get_seq_length(self.layer_idx))
        if keys.shape[2] > filled:
            keys, values = keys[:, :, :filled], values[:, :, :filled]
        return keys, values

    def state_layer(self) -> LinearStateLayer:
        """This layer's ``LinearStateLayer``; an untouched KV layer of the cache is swapped for one."""
        return self.own_layer(LinearStateLayer, "a linear-attention site needs its own state layer")

    def own_layer(self, kind, why: str = "this site needs its own cache layer"):
        """This layer as a ``kind`` (a layer class: linear state, bounded streaming cache); an untouched KV layer
        of the cache is swapped for one."""
        layers = self.cache.layers
        if getattr(self.cache, "layer_class_to_replicate", None) is not None:
            while len(layers) <= self.layer_idx:
                layers.append(self.cache.layer_class_to_replicate())
        layer = layers[self.layer_idx]
        if not isinstance(layer, kind):
            if getattr(layer, "is_initialized", False):
                raise ValueError(f"cache layer {self.layer_idx} already holds keys and values; {why} "
                                 "(start from an empty cache)")
            layer = layers[self.layer_idx] = kind()
        return layer


def cache_bytes(cache) -> list:
    """Bytes each layer of ``cache`` holds (keys and values, or a linear state), measured from its tensors."""
    out = []
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):  # a layer with stores besides keys and values (rewrite.span_cache)
            out.append(layer.nbytes())
            continue
        total = 0
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
        out.append(total)
    return out
