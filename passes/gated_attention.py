"""gated-attention: a per-head, per-token sigmoid gate on each head's output (Bondarenko et al. 2023).

    out = Σ_i g_i(t) · W_o^i · head_i(t) + b_o,    g_i(t) = sigmoid(w_iᵀ x_i(t) + b_i) / π_init

where x is the layer's input hidden state (not the attention output) and x_i its i-th slice of D/Hq
features (``all_features=true``: x_i = x, i.e. one Linear(D→Hq), as the paper used for OPT-1.3B).

Initialisation (``init``):
- ``identity`` (default): w = 0, b = logit(π_init), output × 1/π_init → every gate is exactly 1 and the
  model is unchanged (exact);
- ``normal``: w ~ N(0, std²) (the paper's fine-tuning init, std = 1e-3), same bias and rescaling
  (not exact: gates ≈ 1).

Cases handled:
1. every site, any layout (``BSD`` or seq-first ``SBD``), self- or cross-attention (the gate reads the
   query-side input), GQA/DHA maps, any score function;
2. widths not divisible by the head count with ``all_features=true``.
Refused:
1. a site already gated (``head_gate`` set by another pass): skipped with a diagnostic;
2. a site whose input width D is not divisible by its query heads, per-head variant: skipped with a
   diagnostic naming ``all_features=true`` as the fix;
3. ``init`` other than identity|normal, π_init outside (0, 1), std < 0: SpecError.
"""
from __future__ import annotations

import dataclasses

from rewrite.errors import SpecError
from rewrite.pass_base import Diagnostic, SitePass, register
from rewrite.scores import SigmoidHeadGate, attach

__all__ = ["GatedAttention"]

INITS = ("identity", "normal")


@register
@dataclasses.dataclass(frozen=True)
class GatedAttention(SitePass):
    """Add a sigmoid head gate to every attention site."""

    name = "gated-attention"
    init: str = "identity"  # identity (exact) | normal (w ~ N(0, std²))
    all_features: bool = False  # one Linear(D→Hq) instead of Hq Linear(D/Hq→1)
    pi_init: float = 0.5  # gate probability at init; bias = logit(π_init), output × 1/π_init
    std: float = 1e-3  # weight std for init=normal
    seed: int = 0  # generator seed for init=normal

    @property
    def exact(self) -> bool:
        return self.init == "identity"

    def check_options(self) -> None:
        if self.init not in INITS:
            raise SpecError(f"gated-attention{{init}}: expected one of {', '.join(INITS)}, got {self.init!r}")
        if not 0.0 < self.pi_init < 1.0:
            raise SpecError(f"gated-attention{{pi_init}}: the initial gate probability must lie in (0, 1), "
                            f"got {self.pi_init}")
        if self.std < 0:
            raise SpecError(f"gated-attention{{std}}: must be >= 0, got {self.std}")

    def rewrite_site(self, index, op, ctx):
        name = op.info.name
        if op.head_gate is not None:
            return None, {}, [Diagnostic("skip", f"already has a head gate ({type(op.head_gate).__name__})", name)]
        dim, heads = op.wq.shape[2], op.q_heads
        if not self.all_features and dim % heads:
            return None, {}, [Diagnostic(
                "skip", f"input width {dim} is not divisible by {heads} query heads, so x cannot be split "
                        "into heads; use gated-attention{all_features=true}", name)]
        gate = SigmoidHeadGate(heads, dim, all_features=self.all_features, pi_init=self.pi_init,
                               std=self.std if self.init == "normal" else 0.0, seed=self.seed + index)
        gate.to(dtype=op.wq.dtype, device=op.wq.device)
        new = attach(op, head_gate=gate)
        params = sum(p.numel() for p in gate.parameters())
        return new, {"gate_params": params, "gate_inputs": gate.weight.shape[1]}, []
