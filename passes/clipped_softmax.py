"""clipped-softmax: replace softmax by a clipped, stretched softmax (Bondarenko et al. 2023).

    A = clip((ζ − γ)·softmax(q kᵀ·scale + M) + γ, 0, 1),    out_i = A_i V_i

With γ < 0 an attention head can put exactly zero weight on tokens and so "do nothing" without
pushing its logits (and the residual stream) to extreme values. ``alpha`` gives the length-robust
form γ = −α/T, T = the site's key length in the example inputs (fixed at conversion, as the paper
fixes it at the training length). Masked positions get exactly zero weight.

Cases handled:
1. every site: bool and additive (−inf or finite) masks, causal sites, GQA/DHA maps (k/v expanded
   with the op's maps), RoPE / q-k norm (the transforms run before the score function);
2. ζ = 1, γ = 0 is exactly softmax (the pass is then exact); any ζ ≥ 1, γ ≤ 0 otherwise.
Refused (SpecError):
1. ζ < 1 or γ > 0 (the paper's range; other values do not give exact zeros/ones);
2. ``alpha`` together with ``gamma``; ``alpha`` < 0.
Skipped with a diagnostic: a site that already has a score function (linear attention, ...), and with
``alpha`` a site whose key length is unknown.
Pitfall: the rewritten core is eager attention; fused SDPA/flash kernels no longer apply.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from rewrite.errors import SpecError
from rewrite.pass_base import Diagnostic, SitePass, register
from rewrite.scores import ClippedSoftmax, attach

__all__ = ["ClippedSoftmaxPass"]


@register
@dataclasses.dataclass(frozen=True)
class ClippedSoftmaxPass(SitePass):
    """Swap every site's softmax for clip((ζ−γ)·softmax + γ, 0, 1)."""

    name = "clipped-softmax"
    zeta: float = 1.0  # stretch factor ζ ≥ 1
    gamma: Optional[float] = None  # offset γ ≤ 0 (0 when neither gamma nor alpha is given)
    alpha: Optional[float] = None  # γ = −α/T with T the site's example key length

    @property
    def exact(self) -> bool:
        return self.zeta == 1.0 and not self.gamma and not self.alpha

    def check_options(self) -> None:
        if self.zeta < 1.0:
            raise SpecError(f"clipped-softmax{{zeta}}: ζ must be >= 1 (stretches softmax so that weights can "
                            f"reach 1), got {self.zeta}")
        if self.gamma is not None and self.gamma > 0.0:
            raise SpecError(f"clipped-softmax{{gamma}}: γ must be <= 0 (a negative γ lets weights reach exactly 0), "
                            f"got {self.gamma}")
        if self.alpha is not None and self.gamma is not None:
            raise SpecError("clipped-softmax: give either gamma or alpha (γ = −α/T), not both")
        if self.alpha is not None and self.alpha < 0.0:
            raise SpecError(f"clipped-softmax{{alpha}}: α must be >= 0 (γ = −α/T), got {self.alpha}")

    def rewrite_site(self, index, op, ctx):
        name = op.info.name
        if op.score_fn is not None:
            return None, {}, [Diagnostic("skip", f"already has a score function ({type(op.score_fn).__name__})",
                                         name)]
        gamma = self.gamma or 0.0
        stats = {}
        if self.alpha is not None:
            length = op.info.kv_len or op.info.q_len
            if not length:
                return None, {}, [Diagnostic("skip", "key length of the example inputs unknown; give gamma "
                                                     "instead of alpha", name)]
            gamma = -self.alpha / length
            stats["T"] = length
        new = attach(op, score_fn=ClippedSoftmax(self.zeta, gamma))
        stats.update({"zeta": self.zeta, "gamma": gamma})
        return new, stats, []
