"""Pass, PassResult, Diagnostic and the registry.

A pass is a frozen dataclass with a ``name`` and typed options. ``run(gm, ctx)`` is functional: it
returns a new GraphModule (``rewrite.graph.with_sites`` shares everything unchanged) and never
mutates its input, prints or writes files.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

from torch import fx

__all__ = ["Diagnostic", "PassResult", "PassContext", "Pass", "SitePass", "Calibration", "register", "REGISTRY",
           "run_pass"]

REGISTRY: dict = {}


@dataclasses.dataclass
class Diagnostic:
    """Something a pass wants the user to know: a skipped site and why, a warning, a note."""

    level: str  # "skip" | "warning" | "info"
    message: str
    site: str = ""

    def __str__(self):
        return f"{self.level}: {self.site + ': ' if self.site else ''}{self.message}"


@dataclasses.dataclass
class PassResult:
    graph: fx.GraphModule
    changed: bool
    stats: dict = dataclasses.field(default_factory=dict)  # per-site or global numbers for the report
    diagnostics: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph: calibration batches and the captured model."""

    calibration: Optional[list] = None  # list of kwargs dicts for the graph
    captured: Any = None  # rewrite.capture.Captured
    progress: Any = None  # callable(iterable, description) -> iterable
    original_outputs: Any = None  # cached original outputs on calibration batches

    def call(self, gm):
        """A function running ``gm`` on one calibration batch (a kwargs dict)."""
        fixed = self.captured.fixed if self.captured is not None else {}
        return lambda kw: gm(**kw, **fixed)

    def track(self, iterable, description: str):
        return self.progress(iterable, description) if self.progress else iterable


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a calibrated pass reads, so a streamed conversion (``rewrite.stream_layers``) can gather it.

    stats: what each site's decision is computed from, all read off the site's own inputs on the calibration
        batches: "input_gram" (Σ x xᵀ of the key/value input), "attention_probs" (softmax rows: entropy),
        "site_inputs" (the inputs themselves: reconstruction error); "model_gradients" (gradients of the
        model's loss through every later layer) and "whole_model" (undeclared) cannot be gathered per layer.
    scope: "site" (each site decided from its own statistics) | "model" (one decision across the sites:
        streamed as a gathering sweep, ``gather``/``decide``, then an applying sweep, ``apply``).
    why: for stats that cannot stream, the reason and the fix, said in the refusal.
    gather_reads_inputs, apply_reads_inputs: whether ``gather`` / ``apply`` (scope "model") read the site's
        calibration inputs; when not (dha's budget needs only head counts, prune-heads' removal only the decided
        heads), that sweep runs no layer forward for this pass.
    """

    stats: tuple
    scope: str = "site"
    why: str = ""
    gather_reads_inputs: bool = True
    apply_reads_inputs: bool = True

    def reads_inputs(self, gathering: bool) -> bool:
        """Whether this sweep (gathering this pass's numbers, or applying its decision) reads the site's inputs."""
        if self.scope != "model":
            return True
        return self.gather_reads_inputs if gathering else self.apply_reads_inputs

    @property
    def streams(self) -> bool:
        return not ({"model_gradients", "whole_model"} & set(self.stats))


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses set ``name``, ``exact`` and implement ``run``."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    @property
    def exact(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def calibration(self) -> Optional[Calibration]:
        """What this pass reads from calibration data (None: nothing). Passes that stream declare it."""
        if not self.needs_calibration:
            return None
        return Calibration(("whole_model",), "model", f"{self.name} has not declared per-site statistics")

    def spec(self) -> str:
        """This pass as a pipeline string, e.g. ``gqa{kv_heads=2,method=mean}``."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or v == f.default:
                continue
            if isinstance(v, dict):
                v = ";".join(f"{k}:{'/'.join(map(str, x))}" for k, x in v.items())
            opts.append(f"{f.name}={v}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def run_pass(p, gm, ctx, where: str) -> "PassResult":
    """``p.run(gm, ctx)``; an exception other than the project's own becomes a PassError naming the pass and
    ``where`` it ran ("after the following passes: [...]", "on layer 3 (...)")."""
    from .errors import PassError, RewriteError

    try:
        return p.run(gm, ctx)
    except RewriteError:
        raise
    except Exception as e:
        raise PassError(f"an error occurred when running the '{p.spec()}' pass {where}: {type(e).__name__}: {e}") from e


def rewrite_each_site(gm, rewrite: Callable, latent: bool = False) -> PassResult:
    """``rewrite(index, op) -> (new_op | None, stats, diagnostics)`` on every site, gathered into one result.

    Multi-head latent attention sites (``rewrite.latent``) are skipped with the reason unless ``latent``."""
    from .graph import sites, with_sites

    from .heads import FixedHeads
    from .latent import REFUSAL, is_latent

    replace, stats, diags = {}, {}, []
    for i, op in enumerate(sites(gm)):
        if is_latent(op) and not latent:
            diags.append(Diagnostic("skip", f"{op.info.name} {REFUSAL}", op.info.name))
            continue
        try:
            new, st, dg = rewrite(i, op)
        except FixedHeads as e:  # a head change this site cannot take exactly: skipped, with the reason
            new, st, dg = None, {}, [Diagnostic("skip", str(e), op.info.name)]
        diags.extend(dg)
        if st:
            stats[op.info.name] = st
        if new is not None:
            replace[i] = new
    return PassResult(with_sites(gm, replace), bool(replace), stats, diags)


@dataclasses.dataclass(frozen=True)
class SitePass(Pass):
    """A pass that rewrites each canonical Attention op on its own.

    Subclasses implement ``rewrite_site(index, op, ctx) -> (new_op | None, stats, diagnostics)``;
    returning None leaves the site unchanged.
    """

    def run(self, gm, ctx):
        self.check_options()
        return rewrite_each_site(gm, lambda i, op: self.rewrite_site(i, op, ctx))

    def check_options(self) -> None:
        """Raise SpecError for bad options before any work."""

    def rewrite_site(self, index, op, ctx):  # pragma: no cover - abstract
        raise NotImplementedError


def register(cls):
    """Class decorator: make a pass reachable by its spec name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls
