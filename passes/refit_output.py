"""refit-output{ridge}: each converted site's output projection refitted to the original site by least squares.

After a lossy rewrite the heads' outputs z_t = [o_t^1; …; o_t^H] (token t, per-head attention outputs of the
*converted* site, ``[H·dv]``) no longer give the original output y_t under the old W_o. On the calibration
batches, with y_t the captured (original) site's output on the same inputs x_t:

    W_o' = argmin_W Σ_t ‖y_t − b_o − W z_t‖² + λ‖W‖²  =  (Σ_t (y_t − b_o) z_tᵀ) (Σ_t z_t z_tᵀ + λI)⁻¹,

λ = ridge · mean(diag Σ z zᵀ). The inputs x_t are the ones the converted model gives the site, so each fit
corrects the site's own error on the inputs it will see (the sequential, GPTQ-style choice). Exact (W_o' = W_o)
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

import torch
from torch import nn

from rewrite.graph import with_sites
from rewrite.heads import rebuild
from rewrite.importance import site_inputs
from rewrite.latent import is_latent
from rewrite.pass_base import PassResult, register
from rewrite.refit import SiteRefit

__all__ = ["RefitOutput", "head_outputs"]


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

    why_not = staticmethod(_why_not)

    def run(self, gm, ctx) -> PassResult:
        ops, bases, todo, diags = self.paired_sites(gm, ctx)
        zz = {i: 0.0 for i in todo}
        yz = {i: 0.0 for i in todo}
        err = {i: [0.0, 0.0] for i in todo}  # Σ‖y − b − W_o z‖², Σ‖y − b‖²
        old = {i: ops[i].wo.detach().double().reshape(ops[i].wo.shape[0], -1) for i in todo}
        for i, op, args in site_inputs(gm, ctx, "refit-output (least squares per site)"):
            if i not in zz:
                continue
            with torch.no_grad():
                y = bases[i](*args)
            _, z = head_outputs(op, args)
            y = y.reshape(-1, y.shape[-1]).double()
            if op.bo is not None:
                y = y - op.bo.detach().double()
            z = z.double()
            zz[i] = zz[i] + z.T @ z
            yz[i] = yz[i] + y.T @ z
            err[i][0] += float(((y - z @ old[i].T) ** 2).sum())
            err[i][1] += float((y ** 2).sum())
        replace, stats = {}, {}
        for i in todo:
            op, g = ops[i], zz[i]
            lam = self.ridge * float(torch.diagonal(g).mean().clamp_min(1e-30))
            w = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), yz[i].T).T
            before = old[i]
            fitted = float(torch.einsum("ij,jk,ik->", w, g, w) - 2 * (w * yz[i]).sum())
            fitted_before = float(torch.einsum("ij,jk,ik->", before, g, before) - 2 * (before * yz[i]).sum())
            total = err[i][1]
            stats[op.info.name] = {"rel_err_before": err[i][0] / max(total, 1e-30),
                                   "rel_err_after": (err[i][0] + fitted - fitted_before) / max(total, 1e-30)}
            replace[i] = _with_wo(op, w.to(op.wo.dtype).reshape(op.wo.shape))
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)
