"""Calibration statistics, accumulated in streaming form over batches.

Everything a head-merging pass needs about keys and values follows from the input
autocorrelation of each site: with K = X W_kᵀ, Kᵀ K = W_k (Xᵀ X) W_kᵀ. So one ``D×D`` running sum per
site (fp64 accumulator) serves GQA alignment, DHA fusion and MASA refinement.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .graph import sites
from .ir import hidden

__all__ = ["SiteRecord", "InputStats", "record_site_inputs", "input_grams", "head_grams", "real_keys"]


@dataclasses.dataclass
class SiteRecord:
    """The arguments one site received on one batch: (x, kv, mask, *side)."""

    args: tuple

    @property
    def x(self):
        return self.args[0]

    @property
    def kv_input(self):
        return self.args[1] if self.args[1] is not None else self.args[0]


class _Seen(Exception):
    """Raised by a one-site graph's site once its inputs are seen: the site's own output is not needed."""


ONE_SITE = "rewrite_one_site"  # gm.meta key: the graph is x -> site(x), so its site's inputs are all it computes


def _each_batch(gm, call: Callable, batches, on_site: Callable, track=None, description="calibrating",
                inputs_only: bool = False):
    """Run ``gm`` on every batch, calling ``on_site(i, args, output)`` as site i runs. ``inputs_only``: the
    callback reads args alone, so a one-site graph (``stream_layers.one_site_graph``) skips the site itself."""
    ops = sites(gm)
    skip = inputs_only and gm.meta.get(ONE_SITE, False)

    def seen(i, a):
        on_site(i, a, None)
        raise _Seen

    hooks = [op.register_forward_pre_hook(lambda m, a, i=i: seen(i, a)) if skip else
             op.register_forward_hook(lambda m, a, o, i=i: on_site(i, a, o)) for i, op in enumerate(ops)]
    try:
        with torch.no_grad():
            for kw in (track(batches, description) if track else batches):
                try:
                    call(kw)
                except _Seen:
                    pass
    finally:
        for h in hooks:
            h.remove()


def record_site_inputs(gm, call: Callable, batches, track=None) -> list:
    """Per site, the list of SiteRecords over the batches (for small models and analysis)."""
    out = [[] for _ in sites(gm)]
    _each_batch(gm, call, batches, lambda i, a, o: out[i].append(SiteRecord(tuple(a))), track, inputs_only=True)
    return out


def real_keys(mask: Optional[torch.Tensor], batch: int, k_len: int) -> Optional[torch.Tensor]:
    """``[B, Sk]``: keys some query may see under the SDPA ``mask`` (False = padding); None = all."""
    if mask is None:
        return None
    keep = ~hidden(mask)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    return keep.any(dim=2).any(dim=1).expand(batch, k_len)


def _tokens(x: torch.Tensor, keep: Optional[torch.Tensor] = None, layout: str = "BSD") -> torch.Tensor:
    """The rows of ``x`` (``[B, S, D]``, or ``[S, B, D]`` for "SBD") whose ``keep [B, S]`` is True."""
    if keep is None:
        return x.reshape(-1, x.shape[-1])
    return (x.transpose(0, 1) if layout == "SBD" else x)[keep]


def odd_sequences(batch: int, first: int) -> tuple:
    """(which of a batch's ``batch`` sequences are odd-numbered, counting from ``first`` [B] bool; the count after
    it): the two folds of a cross-validation over calibration sequences."""
    return (first + torch.arange(batch)) % 2 == 1, first + batch


@dataclasses.dataclass
class InputStats:
    """Running sums over the key/value input tokens of one site (fp64)."""

    gram: torch.Tensor  # Σ x xᵀ  [D, D]
    total: torch.Tensor  # Σ x     [D]
    count: int

    @classmethod
    def empty(cls, dim: int) -> "InputStats":
        return cls(torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0)

    def add(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None, layout: str = "BSD") -> None:
        """Add the tokens of ``x`` (only those where ``keep [B, S]`` is True, when given)."""
        t = _tokens(x, keep, layout).to(self.gram.device, torch.float64)  # sums stay where they were made (CPU)
        self.gram += t.T @ t
        self.total += t.sum(0)
        self.count += t.shape[0]

    def __add__(self, other: "InputStats") -> "InputStats":
        """The sums over both token sets."""
        return InputStats(self.gram + other.gram, self.total + other.total, self.count + other.count)


def input_grams(gm, call: Callable, batches, track=None) -> list:
    """Per site: InputStats of the key/value input (queries read the same input for self-attention).

    Padding tokens (keys the site's mask hides from every query) are left out.
    """
    ops = sites(gm)
    stats = [None] * len(ops)

    def on_site(i, args, _):
        x = args[1] if args[1] is not None else args[0]
        layout = ops[i].info.layout
        b, s = (x.shape[1], x.shape[0]) if layout == "SBD" else (x.shape[0], x.shape[1])
        if stats[i] is None:
            stats[i] = InputStats.empty(x.shape[-1])
        stats[i].add(x, real_keys(args[2] if len(args) > 2 else None, b, s), layout)

    _each_batch(gm, call, batches, on_site, track, "calibration statistics", inputs_only=True)
    return stats


def head_grams(w: torch.Tensor, b: Optional[torch.Tensor], gram: torch.Tensor, mean: Optional[torch.Tensor] = None,
               n: int = 1) -> torch.Tensor:
    """Cross-head second moments E[y_i y_jᵀ] of y_h = W_h x (+ b_h), all heads at once: [H, H, d, d].

    ``gram`` is Σ x xᵀ over n tokens; ``mean`` is Σ x (needed only with a bias).
    """
    h, d, dim = w.shape
    W = w.reshape(h * d, dim).double()
    m = W @ gram.double() @ W.T / max(n, 1)
    if b is not None and mean is not None:
        bw = b.reshape(-1).double()
        mu = W @ mean.double() / max(n, 1)
        m = m + torch.outer(mu, bw) + torch.outer(bw, mu) + torch.outer(bw, bw)
    return m.reshape(h, d, h, d).permute(0, 2, 1, 3)
