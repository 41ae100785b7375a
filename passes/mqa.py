"""mqa{method=mean|aligned}: multi-query attention, every query head reads one shared KV head.

    softmax(Q_i K_{m(i)}ᵀ·s) V_{m(i)}  →  softmax(Q_i K̃ᵀ·s) Ṽ,   W̃_k = mean_j T_j W_k^j (same for V)

This is ``gqa{kv_heads=1}`` (see passes/gqa.py for the cases handled and refused); ``aligned``
needs calibration data.
"""
from __future__ import annotations

import dataclasses

from rewrite.errors import SpecError
from rewrite.pass_base import Calibration, Pass, register

from .gqa import GQA, METHODS

__all__ = ["MQA"]


@register
@dataclasses.dataclass(frozen=True)
class MQA(Pass):
    """GQA with a single KV head per site."""

    name = "mqa"
    method: str = "mean"

    def __post_init__(self):
        self.check_options()

    @property
    def needs_calibration(self) -> bool:
        return self.method == "aligned"

    @property
    def calibration(self):
        """Aligned merging reads each site's key/value input gram: streams layer by layer."""
        return Calibration(("input_gram",)) if self.method == "aligned" else None

    def as_gqa(self) -> GQA:
        return GQA(kv_heads=1, method=self.method)

    def check_options(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"mqa{{method={self.method}}}: unknown method; valid: {', '.join(METHODS)}")

    def run(self, gm, ctx):
        return self.as_gqa().run(gm, ctx, spec=self.spec())
