"""What the refit passes share (``refit-output``, ``refit-query``): the ridge option, the sites of the graph
paired one for one with the captured (original) sites, and the refusals.

Each refit fits one projection of a converted site to its original site, on the inputs the converted model
gives that site during calibration; that needs the captured model beside the converted one, so a refit
cannot stream layer by layer.
"""
from __future__ import annotations

import dataclasses

from .errors import PassError, SpecError
from .graph import sites
from .pass_base import Calibration, Diagnostic, Pass

__all__ = ["SiteRefit"]


@dataclasses.dataclass(frozen=True)
class SiteRefit(Pass):
    """Base of a refit pass: subclasses set ``name``, ``fits`` (what is fitted, for the refusals), ``ridge_of``
    (what the ridge is a fraction of) and ``why_not(op, base)`` (why a site is skipped, "" to fit it)."""

    needs_calibration = True
    fits = ""
    ridge_of = ""
    ridge: float = 1e-3

    def __post_init__(self):
        self.check_options()

    @property
    def calibration(self):
        return Calibration(("whole_model",), "site", f"{self.name} reads the captured (original) site beside the "
                           "converted one on the same inputs, which a layer-by-layer conversion does not hold; "
                           "convert in memory")

    def check_options(self) -> None:
        if self.ridge is not None and not self.ridge > 0:
            raise SpecError(f"{self.name}{{ridge={self.ridge}}}: ridge must be > 0 (a fraction of {self.ridge_of}, "
                            "e.g. 1e-3)")

    def why_not(self, op, base) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def paired_sites(self, gm, ctx) -> tuple:
        """(the graph's sites, the captured sites, the indices to fit, a skip Diagnostic for every other site)."""
        self.check_options()
        if not ctx.calibration or ctx.captured is None:
            raise PassError(f"{self.spec()}: needs calibration data (pass calibration=[batches, ...]) and the "
                            f"captured model to fit {self.fits}")
        ops, bases = sites(gm), sites(ctx.captured.gm)
        if len(ops) != len(bases):
            raise PassError(f"{self.spec()}: the graph has {len(ops)} attention sites and the captured model "
                            f"{len(bases)}; {self.name} needs them one for one")
        diags, todo = [], []
        for i, (op, base) in enumerate(zip(ops, bases)):
            why = "unchanged by the pipeline" if op is base else self.why_not(op, base)
            if why:
                diags.append(Diagnostic("skip", why, op.info.name))
            else:
                todo.append(i)
        return ops, bases, todo, diags
