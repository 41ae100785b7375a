"""local-heads: streaming heads (attention sinks + a recent window) beside full "retrieval" heads (DuoAttention,
retrieval heads, LS-attention; METHODS.md card 10).

    o_h = softmax(q_h Kᵀ·scale + M + S_h) V,   S_h(i, j) = 0 if j ≤ i and (i − j < w or rank(j) < s), else −∞

for the chosen streaming heads h (``rewrite.spans``; full heads keep M). The rest of the op is untouched; the
choice is made by a long-range score (``rewrite.long_range``; lowest need → streaming). At decode time a
streaming KV head keeps only s + w cache entries (``rewrite.span_cache``).

Options (exactly one of ``ratio`` / ``heads``):
    ratio: fraction of all query heads (of causal sites) made streaming, in [0, 1), one global ranking;
    heads: ``{layer: [h, ...]}`` (spec ``heads={0:1/2;3:0}``), the streaming heads, site index = layer;
    window: recent tokens each streaming head sees (its own included), ≥ 1; sinks: first real tokens, ≥ 0;
    score: duo | retrieval | distance | random (``rewrite.long_range``); seed;
    steps, l1: the gate fit of score=duo.

Cases handled: MHA and GQA (the query heads sharing a KV head, or a (key, value) head pair, are decided
together: their mean score), RoPE and q/k norms (the span acts on the scores only), padding (sinks are real tokens).
Refused (SpecError / PassError, with the message): window < 1, sinks < 0, ratio outside [0, 1), both or neither
of ratio and heads, unknown score, ``heads=`` naming a missing site or head, an encoder (non-causal) site or
half of a KV group; a score that needs calibration (distance, retrieval, duo) without it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import rebuild
from rewrite.long_range import distance_scores, duo_scores, retrieval_scores
from rewrite.pass_base import Diagnostic, Pass, PassResult, register

__all__ = ["LocalHeads", "SCORES", "kv_groups"]

SCORES = ("duo", "retrieval", "distance", "random")


def kv_groups(op) -> torch.Tensor:
    """``[Hq]`` long: the group of each query head, one group per (key head, value head) pair it reads."""
    pairs = {}
    return torch.tensor([pairs.setdefault(p, len(pairs)) for p in zip(op.k_map.tolist(), op.v_map.tolist())])


def _causal(op) -> bool:
    return bool(op.causal or op.info.causal_mask) and not op.info.cross


@register
@dataclasses.dataclass(frozen=True)
class LocalHeads(Pass):
    name = "local-heads"

    ratio: Optional[float] = None
    heads: Optional[dict] = None
    window: int = 256
    sinks: int = 4
    score: str = "duo"
    seed: int = 0
    steps: int = 40
    l1: float = 0.05

    def __post_init__(self):
        self.check_options()

    def check_options(self) -> None:
        if (self.ratio is None) == (self.heads is None):
            raise SpecError("local-heads: give exactly one of ratio=FRACTION or heads={layer:h1/h2;...}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise SpecError(f"local-heads: ratio={self.ratio} must be in [0, 1) (the share of streaming heads)")
        if self.window < 1:
            raise SpecError(f"local-heads: window={self.window} must be ≥ 1 (the recent tokens a streaming head sees)")
        if self.sinks < 0:
            raise SpecError(f"local-heads: sinks={self.sinks} must be ≥ 0 (the first tokens a streaming head keeps)")
        if self.score not in SCORES:
            raise SpecError(f"local-heads: unknown score {self.score!r}; valid: {', '.join(SCORES)}")

    def run(self, gm, ctx) -> PassResult:
        self.check_options()
        ops = sites(gm)
        diags = [Diagnostic("skip", "not causal (an encoder or cross-attention site): a streaming head's window "
                                    "and bounded cache are defined for decoders only", op.info.name)
                 for op in ops if not _causal(op)]
        groups = [kv_groups(op) for op in ops]
        scores = None
        if self.heads is not None:
            streaming = self._explicit(ops, groups)
        else:
            if not any(_causal(op) for op in ops):
                raise PassError(f"local-heads: no causal site ({ops[0].info.name} and the others are encoder "
                                "attention); streaming heads need a decoder")
            scores = self._scores(gm, ctx, groups)
            streaming = self._ranked(ops, groups, scores)
        replace, stats = {}, {}
        for i, op in enumerate(ops):
            chosen = sorted(streaming.get(i, ()))
            stats[op.info.name] = {"streaming": chosen, "window": self.window, "sinks": self.sinks,
                                   "score": self.score, "q_heads": op.q_heads}
            if scores is not None:
                stats[op.info.name]["long_range_score"] = [round(float(x), 6) for x in scores[i]]
            if not chosen:
                continue
            window = torch.zeros(op.q_heads, dtype=torch.long)
            window[chosen] = self.window
            sinks = torch.where(window > 0, self.sinks, 0)
            replace[i] = rebuild(op, window=window, sinks=sinks)
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)

    def _scores(self, gm, ctx, groups) -> list:
        if self.score == "random":
            g = torch.Generator().manual_seed(self.seed)
            return [torch.rand(op.q_heads, generator=g, dtype=torch.float64) for op in sites(gm)]
        if not (ctx is not None and ctx.calibration):
            raise PassError(f"local-heads: score={self.score} needs calibration text longer than window={self.window}:"
                            " pass calibration=[batches, ...] to rewrite.convert (CLI: --calibration FILE), or use "
                            "score=random")
        if self.score == "distance":
            return distance_scores(gm, ctx, self.window, self.sinks)
        if self.score == "retrieval":
            return retrieval_scores(gm, ctx, self.window, self.sinks, self.seed)
        return duo_scores(gm, ctx, self.window, self.sinks, groups, self.steps, self.l1, seed=self.seed)

    def _explicit(self, ops, groups) -> dict:
        out = {}
        for layer, heads in self.heads.items():
            if not 0 <= layer < len(ops):
                raise SpecError(f"local-heads: heads= names layer {layer}, but the model has {len(ops)} attention "
                                f"sites (0..{len(ops) - 1})")
            op, chosen = ops[layer], set(heads)
            bad = [h for h in chosen if not 0 <= h < op.q_heads]
            if bad:
                raise SpecError(f"local-heads: {op.info.name} has {op.q_heads} heads; no head {bad}")
            if not _causal(op):
                raise SpecError(f"local-heads: {op.info.name} is not causal (encoder attention); streaming heads "
                                "need a decoder site")
            for g in set(groups[layer][sorted(chosen)].tolist()):
                members = set((groups[layer] == g).nonzero().flatten().tolist())
                if not members <= chosen:
                    raise SpecError(f"local-heads: query heads {sorted(members)} of {op.info.name} share one KV head; "
                                    f"make all of them streaming or none (heads= names {sorted(members & chosen)})")
            out[layer] = chosen
        return out

    def _ranked(self, ops, groups, scores) -> dict:
        pool = []  # (mean score of the group, site, members)
        for i, (op, grp, s) in enumerate(zip(ops, groups, scores)):
            if not _causal(op):
                continue
            for g in range(int(grp.max()) + 1):
                members = (grp == g).nonzero().flatten().tolist()
                pool.append((float(s[members].mean()), i, members))
        total = sum(len(m) for _, _, m in pool)
        quota, taken, out = self.ratio * total, 0, {}
        for _, i, members in sorted(pool, key=lambda t: (t[0], t[1], t[2])):
            if abs(taken + len(members) - quota) >= abs(taken - quota):
                continue
            out.setdefault(i, set()).update(members)
            taken += len(members)
        return out
