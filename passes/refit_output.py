"""refit-output{ridge}: each converted site's output projection refitted to the original site by least squares.

After a lossy rewrite the heads' outputs z_t = [o_t^1; …; o_t^H] (token t, per-head attention outputs of the
*converted* site, ``[H·dv]``) no longer give the original output y_t under the old W_o. On the calibration
batches, with y_t the captured (original) site's output on the same inputs x_t:

    W_o' = argmin_W Σ_t ‖y_t − b_o − W z_t‖² + λ‖W − W_o‖²  =  (Σ_t (y_t − b_o) z_tᵀ + λ W_o) (Σ_t z_t z_tᵀ + λI)⁻¹,

λ = ridge · mean(diag Σ z zᵀ): the ridge pulls toward the W_o there is, so directions that the calibration
heads' outputs never excite keep it, and λ → ∞ is no refit. ``ridge`` unset (the default): chosen per site by
2-fold cross-validation over the calibration sequences (fitted on the even ones, scored on the odd ones and the
other way round) among RIDGES and no refit at all, since a few calibration tokens against the width H·dv overfit
a small ridge (random-weight LLaMA, 12 tokens, width 64: the fixed 1e-3 raised the output error 0.56 → 0.77);
one calibration sequence (no held-out fold): RIDGES' largest. The inputs x_t are the ones the converted model
gives the site, so each fit corrects the site's own error on the inputs it will see (the sequential, GPTQ-style choice). Exact (W_o' = W_o)
when the site already reproduces the original, up to the ridge. Lossy passes that keep softmax attention gain
most (gqa, dha, sqa, prune-heads, mla); measured on demo-lm in the README.

Skipped by name: sites whose W_o is built from shared weights (masa atoms: a refit would unshare them), linear
attention and other score functions (lit: on demo-lm the refit raised held-out bits per byte), and sites the
pipeline did not change. Refused: no calibration (PassError), a graph whose sites no longer match the captured
ones one for one (PassError), ridge ≤ 0 (SpecError).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import nn

from rewrite.calibrate import odd_sequences
from rewrite.graph import with_sites
from rewrite.heads import rebuild
from rewrite.importance import site_inputs
from rewrite.latent import is_latent
from rewrite.pass_base import PassResult, register
from rewrite.refit import SiteRefit

__all__ = ["RefitOutput", "head_outputs"]

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # cross-validated where ridge is unset (fractions of mean diag Σzzᵀ)


def head_outputs(op, args: tuple) -> tuple:
    """(the site's output, its per-head outputs z ``[tokens, H·dv]`` in the same token order) on ``args``."""
    seen = {}
    merge = op.merge

    def grab(o, wo=None):  # (B, H, S, dv) just before the output projection
        seen["o"] = o
        return merge(o, wo)

    op.merge = grab  # an instance attribute shadows the method for this one call
    try:
        with torch.no_grad():
            y = op(*args)
    finally:
        del op.merge
    o = seen["o"]
    o = o.permute(2, 0, 1, 3) if op.info.layout == "SBD" else o.transpose(1, 2)
    return y, o.flatten(-2).reshape(-1, o.shape[-2] * o.shape[-1])


def _why_not(op, base) -> str:
    if op.score_fn is not None:
        return "a score function (linear attention): not refitted (it raised held-out perplexity on demo-lm)"
    if getattr(op, "weights", None) is not None:
        return "its W_o comes from shared weights (masa atoms); a refit would unshare them"
    if op.wo.shape[0] != base.wo.shape[0]:
        return f"its output width {op.wo.shape[0]} differs from the captured site's {base.wo.shape[0]}"
    return ""


def _with_wo(op, wo: torch.Tensor):
    if is_latent(op):
        new = copy.copy(op)
        new._parameters = dict(op._parameters)
        new.wo = nn.Parameter(wo)
        return new
    return rebuild(op, wo=wo)


@register
@dataclasses.dataclass(frozen=True)
class RefitOutput(SiteRefit):
    """W_o refitted per site by ridge least squares (see the module docstring)."""

    name = "refit-output"
    fits = "each site to its original output"
    ridge_of = "the mean diagonal of Σ z zᵀ"
    ridge: Optional[float] = None  # None: cross-validated per site (RIDGES, or no refit)

    why_not = staticmethod(_why_not)

    def run(self, gm, ctx) -> PassResult:
        ops, bases, todo, diags = self.paired_sites(gm, ctx)
        folds = {i: [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]] for i in todo}  # even / odd sequences: Σzzᵀ, Σyzᵀ, Σ‖y‖²
        seen = {i: 0 for i in todo}  # sequences so far, per site
        old = {i: ops[i].wo.detach().double().reshape(ops[i].wo.shape[0], -1) for i in todo}
        for i, op, args in site_inputs(gm, ctx, "refit-output (least squares per site)"):
            if i not in folds:
                continue
            with torch.no_grad():
                y = bases[i](*args)
            _, z = head_outputs(op, args)
            sbd = op.info.layout == "SBD"
            odd, seen[i] = odd_sequences(y.shape[1 if sbd else 0], seen[i])
            odd = odd.repeat(y.shape[0]) if sbd else odd.repeat_interleave(y.shape[1])  # per token row
            y = y.reshape(-1, y.shape[-1]).double()
            if op.bo is not None:
                y = y - op.bo.detach().double()
            z = z.double()
            for sums, rows in zip(folds[i], (~odd, odd)):
                zf, yf = z[rows], y[rows]
                sums[0], sums[1], sums[2] = sums[0] + zf.T @ zf, sums[1] + yf.T @ zf, sums[2] + float((yf ** 2).sum())
        replace, stats = {}, {}
        for i in todo:
            op, (even, odd) = ops[i], folds[i]
            g, c, total = (even[k] + odd[k] for k in range(3))
            held_out, ridge = {}, self.ridge
            if ridge is None:
                held_out = self._cross_validate(even, odd, old[i])
                ridge = min(held_out, key=held_out.get) if held_out else RIDGES[-1]
            w = old[i] if ridge == "keep" else _ridge_fit(g, c, old[i], ridge)
            stats[op.info.name] = {"rel_err_before": _sq_err(old[i], g, c, total) / max(total, 1e-30),
                                   "rel_err_after": _sq_err(w, g, c, total) / max(total, 1e-30), "ridge": ridge}
            if held_out:
                stats[op.info.name]["held_out_rel_err"] = held_out
            if ridge != "keep":
                replace[i] = _with_wo(op, w.to(op.wo.dtype).reshape(op.wo.shape))
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)

    def _cross_validate(self, even: list, odd: list, old: torch.Tensor) -> dict:
        """{ridge or "keep": relative error Σ‖y − W z‖² / Σ‖y‖² on one fold of the W fitted on the other, both
        ways summed}; {} when a fold is empty (one calibration sequence)."""
        if not (odd[2] > 0 and even[2] > 0):
            return {}
        total = even[2] + odd[2]
        scores = {r: 0.0 for r in (*RIDGES, "keep")}
        for train, test in ((even, odd), (odd, even)):
            for r in scores:
                w = old if r == "keep" else _ridge_fit(train[0], train[1], old, r)
                scores[r] += _sq_err(w, *test) / total
        return scores


def _ridge_fit(g: torch.Tensor, c: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W tr(W g Wᵀ) − 2 tr(W cᵀ) + λ‖W − prior‖², λ = ridge · mean diag g."""
    lam = ridge * float(torch.diagonal(g).mean().clamp_min(1e-30))
    return torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), (c + lam * prior).T).T


def _sq_err(w: torch.Tensor, g: torch.Tensor, c: torch.Tensor, total: float) -> float:
    """Σ_t ‖y_t − W z_t‖² from the sums g = Σ z zᵀ, c = Σ y zᵀ, total = Σ ‖y‖²."""
    return max(float(torch.einsum("ij,jk,ik->", w, g, w) - 2 * (w * c).sum()) + total, 0.0)
