"""prune-heads: physically remove query heads (Michel et al. 2019; METHODS.md card 5).

    out = Σ_{h ∈ kept} W_o^h · Att_h(x) + b_o        (Att_h reads KV head k_map[h], v_map[h])

W_q rows and W_o columns of removed heads are deleted (``rewrite.heads.select_query_heads``); a KV
head goes only when every query head reading it goes; ``b_o`` is never sliced. The result equals
the original model with the removed heads masked to zero (ξ_h = 0); it is not exact in general.

Options (exactly one of ``ratio`` / ``heads``):
    ratio: fraction of all query heads to remove, in [0, 1);
    heads: ``{layer: [h, ...]}`` (spec ``heads={0:1/2;3:0}``), the heads to remove, site index = layer,
        numbering of the op the pass receives (the original numbering on a fresh capture);
    importance: taylor | taylor-local | magnitude | entropy | random (``rewrite.importance``), for ``ratio``;
    scope: global (one ranking over per-layer ℓ2-normalized scores) | layer (``ratio`` of each layer);
    seed: for importance=random and taylor's sampled targets.

Cases handled:
    1. MHA and GQA sites (also with RoPE / q-k norms: those act per head, for any head count);
    2. ``ratio`` pruning never removes a layer's last head; it moves on to the next-least
       important head elsewhere and says so in a diagnostic;
    3. a site whose heads are all kept is left unchanged.
Refused (SpecError / PassError, with the message):
    1. ratio outside [0, 1); both or neither of ratio and heads; unknown importance or scope;
    2. ``heads=`` naming a site or head that does not exist, or every head of a site;
    3. an importance that needs calibration (taylor, taylor-local, entropy) without calibration (PassError).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from rewrite.errors import SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import FixedHeads, select_query_heads
import torch

from rewrite.importance import NEEDS_CALIBRATION, check_method, head_importance
from rewrite.pass_base import Calibration, Diagnostic, Pass, PassResult, register

__all__ = ["PruneHeads"]


@register
@dataclasses.dataclass(frozen=True)
class PruneHeads(Pass):
    name = "prune-heads"

    ratio: Optional[float] = None
    heads: Optional[dict] = None
    importance: str = "taylor"
    scope: str = "global"
    seed: int = 0

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    def check_options(self) -> None:
        if (self.ratio is None) == (self.heads is None):
            raise SpecError("prune-heads: give exactly one of ratio=FRACTION or heads={layer:h1/h2;...}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise SpecError(f"prune-heads: ratio={self.ratio} must be in [0, 1)")
        check_method(self.importance, "prune-heads")
        if self.scope not in ("global", "layer"):
            raise SpecError(f"prune-heads: unknown scope {self.scope!r}; valid: global, layer")

    @property
    def calibration(self):
        if self.heads is not None or self.importance not in NEEDS_CALIBRATION:
            return None
        if self.importance == "taylor":
            return Calibration(("model_gradients",), "model",
                               "importance=taylor differentiates the model's loss through every later layer, which "
                               "a layer-by-layer conversion never holds; use importance=taylor-local (the gradient of "
                               "each site's own output, which streams), importance=entropy, or convert in memory")
        stats = ("site_inputs",) if self.importance == "taylor-local" else ("attention_probs",)
        return Calibration(stats, "site" if self.scope == "layer" else "model", apply_reads_inputs=False)

    # scope=global streamed in two sweeps (rewrite.stream_layers): scores per site, one ranking, removal per site
    def gather(self, gm, ctx) -> list:
        """Per site of ``gm``, its normalized head scores (a list of floats)."""
        return [s.tolist() for s in head_importance(gm, ctx, self.importance, seed=self.seed)]

    def decide(self, gathered: list, ops: list) -> tuple:
        """(heads to remove per site, diagnostics) from every site's gathered scores; ``ops`` give head counts."""
        remove, diags = self._ranked(ops, [torch.tensor(g, dtype=torch.float64) for g in gathered])
        return [sorted(remove[i]) for i in range(len(ops))], diags

    def apply(self, gm, ctx, plan: list) -> PassResult:
        """Remove the decided heads ``plan`` of the one site of ``gm``."""
        return dataclasses.replace(self, ratio=None, heads={0: list(plan)}).run(gm, ctx)

    def run(self, gm, ctx) -> PassResult:
        self.check_options()
        ops = sites(gm)
        diags = []
        if self.heads is not None:
            remove = self._explicit(ops)
        else:
            scores = head_importance(gm, ctx, self.importance, seed=self.seed)
            remove, diags = self._ranked(ops, scores)
        replace, stats = {}, {}
        for i, op in enumerate(ops):
            gone = sorted(remove.get(i, ()))
            stats[op.info.name] = {"q_heads_before": op.q_heads, "removed": gone,
                                   "q_heads_after": op.q_heads - len(gone)}
            if not gone:
                continue
            try:
                new = select_query_heads(op, [h for h in range(op.q_heads) if h not in gone])
            except FixedHeads as e:  # a q norm over the whole projection: removing heads is not exact
                diags.append(Diagnostic("skip", str(e), op.info.name))
                stats[op.info.name]["q_heads_after"] = op.q_heads
                continue
            stats[op.info.name].update(kv_heads_before=op.kv_heads, kv_heads_after=new.kv_heads)
            replace[i] = new
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)

    def _explicit(self, ops) -> dict:
        remove = {}
        for layer, heads in self.heads.items():
            if not 0 <= layer < len(ops):
                raise SpecError(f"prune-heads: heads= names layer {layer}, but the model has {len(ops)} attention "
                                f"sites (0..{len(ops) - 1})")
            op = ops[layer]
            bad = [h for h in heads if not 0 <= h < op.q_heads]
            if bad:
                raise SpecError(f"prune-heads: {op.info.name} has {op.q_heads} heads; no head {bad}")
            if len(set(heads)) >= op.q_heads:
                raise SpecError(f"prune-heads: cannot remove all {op.q_heads} heads of {op.info.name}; "
                                "keep at least one")
            remove[layer] = set(heads)
        return remove

    def _ranked(self, ops, scores) -> tuple:
        remove = {i: set() for i in range(len(ops))}
        blocked, diags = set(), []
        if self.scope == "layer":
            pools = [[(float(s[h]), i, h) for h in range(op.q_heads)] for i, (op, s) in enumerate(zip(ops, scores))]
            quotas = [round(self.ratio * op.q_heads) for op in ops]
        else:
            pools = [[(float(s[h]), i, h) for i, (op, s) in enumerate(zip(ops, scores)) for h in range(op.q_heads)]]
            quotas = [round(self.ratio * sum(op.q_heads for op in ops))]
        for pool, quota in zip(pools, quotas):
            taken = 0
            for score, i, h in sorted(pool):
                if taken == quota:
                    break
                if len(remove[i]) + 1 >= ops[i].q_heads:
                    blocked.add(i)
                    continue
                remove[i].add(h)
                taken += 1
        for i in sorted(blocked):
            diags.append(Diagnostic("info", f"kept 1 of {ops[i].q_heads} heads: prune-heads never removes "
                                            "the last head of a layer", ops[i].info.name))
        return remove, diags
