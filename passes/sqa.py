"""sqa: Sparse Query Attention (Filipek 2025, arXiv 2510.01817; METHODS.md card 4).

    H query heads, H_k KV heads  ->  q_heads query heads, kv_heads KV heads, g = q_heads / kv_heads,
    out = Σ_f Σ_{h ∈ Q_f} W_o^h · softmax(q_h K_fᵀ·s) V_f + b_o,   K_f = mean_{j ∈ B_f} K_j (same for V)

Every new KV group f keeps the g most important query heads Q_f (``rewrite.importance``) of the old
KV heads B_f it draws on; W_q rows and W_o columns of the others go; the scale is unchanged.
Attention FLOPs scale by q_heads / H. Not exact (query heads are removed).

Cases handled (per site with H query heads and H_k KV groups):
    1. keep: at least kv_heads old groups hold g query heads. Keep the kv_heads groups whose g best
       heads score highest, with those heads; the other groups go with their KV heads. No pooling:
       the kept heads compute exactly what they did (kv_heads = H_k, or q_heads = kv_heads on MHA).
    2. pool: new groups must be larger than the old ones. Old KV heads in contiguous blocks of
       m = H_k / kv_heads; keep the g best query heads of each block; mean-pool the block's KV heads
       still read (``rewrite.heads.pool_kv``).
    3. duplicate: kv_heads > H_k. Every old group keeps its q_heads / H_k best heads, and each KV
       head is copied to kv_heads / H_k groups (``rewrite.heads.duplicate_kv``, exact).
    The result always has contiguous GQA maps (HF repeat_kv order).
Refused:
    1. options: not 1 ≤ kv_heads ≤ q_heads, q_heads % kv_heads != 0, unknown importance (SpecError);
    2. q_heads larger than a site's H (SpecError, naming the site);
    3. a site whose K and V maps differ (DHA), or whose KV heads cannot be split evenly
       (H_k % kv_heads or kv_heads % H_k != 0): skipped with a diagnostic;
    4. importance=taylor|entropy without calibration (PassError).
"""
from __future__ import annotations

import dataclasses

import torch

from rewrite.errors import SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import contiguous_map, duplicate_kv, pool_kv, query_fields, rebuild, select_query_heads
from rewrite.importance import check_method, head_importance
from rewrite.pass_base import Diagnostic, Pass, PassResult, register

__all__ = ["SQA"]


@register
@dataclasses.dataclass(frozen=True)
class SQA(Pass):
    name = "sqa"

    q_heads: int = 0
    kv_heads: int = 0
    importance: str = "magnitude"
    seed: int = 0

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    def check_options(self) -> None:
        if not (self.q_heads and self.kv_heads):
            raise SpecError("sqa: give both q_heads=N and kv_heads=M, e.g. sqa{q_heads=8,kv_heads=4}")
        if not 1 <= self.kv_heads <= self.q_heads:
            raise SpecError(f"sqa: need 1 <= kv_heads <= q_heads, got q_heads={self.q_heads}, "
                            f"kv_heads={self.kv_heads}")
        if self.q_heads % self.kv_heads:
            raise SpecError(f"sqa: q_heads={self.q_heads} is not divisible by kv_heads={self.kv_heads}")
        check_method(self.importance, "sqa")

    def run(self, gm, ctx) -> PassResult:
        self.check_options()
        ops = sites(gm)
        for op in ops:
            if self.q_heads > op.q_heads:
                raise SpecError(f"sqa: q_heads={self.q_heads} exceeds the {op.q_heads} query heads of "
                                f"{op.info.name}; SQA only removes query heads")
        scores = head_importance(gm, ctx, self.importance, seed=self.seed)
        replace, stats, diags = {}, {}, []
        for i, (op, score) in enumerate(zip(ops, scores)):
            groups, step = self._plan(op, score)
            if step not in ("keep", "pool", "duplicate"):
                diags.append(Diagnostic("skip", step, op.info.name))
                continue
            stats[op.info.name] = {"q_heads_before": op.q_heads, "kv_heads_before": op.kv_heads,
                                   "q_heads_after": self.q_heads, "kv_heads_after": self.kv_heads,
                                   "kv_step": step, "kept": _order(op, groups)}
            if self.q_heads == op.q_heads and self.kv_heads == op.kv_heads and step == "keep" \
                    and torch.equal(op.k_map, contiguous_map(op.q_heads, op.kv_heads)):
                continue  # already this shape
            replace[i] = self._convert(op, groups, step)
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)

    def _plan(self, op, score):
        """(query heads of each new KV group, "keep" | "pool" | "duplicate"), or ([], reason to skip)."""
        if not torch.equal(op.k_map, op.v_map) or op.k_heads != op.v_heads:
            return [], "K and V heads are grouped differently (DHA); sqa needs one KV map"
        hk, g = op.k_heads, self.q_heads // self.kv_heads
        members = [[h for h in range(op.q_heads) if int(op.k_map[h]) == j] for j in range(hk)]
        best = [sorted(m, key=lambda h: -float(score[h])) for m in members]
        if self.kv_heads > hk:  # case 3: q_heads/H_k best heads of every old group, KV heads duplicated
            if self.kv_heads % hk or self.q_heads % hk:
                return [], f"{hk} KV heads cannot be duplicated evenly to kv_heads={self.kv_heads}"
            per = self.q_heads // hk
            if any(len(b) < per for b in best):
                return [], f"a KV group has fewer than the {per} query heads q_heads={self.q_heads} needs"
            return [b[:per] for b in best], "duplicate"
        eligible = [j for j in range(hk) if len(best[j]) >= g]
        if len(eligible) >= self.kv_heads:  # case 1: the best kv_heads old groups, kept whole
            value = {j: sum(float(score[h]) for h in best[j][:g]) for j in eligible}
            chosen = sorted(sorted(eligible, key=lambda j: -value[j])[: self.kv_heads])
            return [best[j][:g] for j in chosen], "keep"
        if hk % self.kv_heads:  # case 2 needs equal contiguous blocks of old KV heads
            return [], f"{hk} KV heads cannot be pooled into kv_heads={self.kv_heads} equal contiguous blocks"
        m = hk // self.kv_heads
        blocks = [sum((members[j] for j in range(f * m, (f + 1) * m)), []) for f in range(self.kv_heads)]
        if any(len(b) < g for b in blocks):
            return [], f"a block of {m} KV heads has fewer than the {g} query heads each new group needs"
        return [sorted(b, key=lambda h: -float(score[h]))[:g] for b in blocks], "pool"

    def _convert(self, op, groups, step):
        """Slice the kept query heads (in group order), then pool or duplicate KV heads."""
        order = _order(op, groups)
        new = _reorder(select_query_heads(op, order), sorted(order), order)
        if step == "duplicate":
            return duplicate_kv(new, self.kv_heads)
        if step == "pool":
            return _pool_groups(new, self.kv_heads, self.q_heads // self.kv_heads)
        return new


def _order(op, groups: list) -> list:
    """The kept query heads (original ids) in their new order: group by group, by KV head then id."""
    return [h for grp in groups for h in sorted(grp, key=lambda h: (int(op.k_map[h]), h))]


def _reorder(op, current: list, wanted: list):
    """Permute query heads (exact) from ``current`` order (original ids) to ``wanted`` order."""
    if current == wanted:
        return op
    perm = torch.tensor([current.index(h) for h in wanted])
    gate = op.head_gate.select(perm) if hasattr(op.head_gate, "select") else None  # the gates move with their heads
    return rebuild(op, head_gate=gate, **query_fields(op, perm), k_map=op.k_map[perm], v_map=op.v_map[perm])


def _pool_groups(op, kv_heads: int, g: int):
    """Mean-pool, for each contiguous block of g query heads, the KV heads that block reads."""
    groups = [sorted(set(op.k_map[f * g:(f + 1) * g].tolist())) for f in range(kv_heads)]
    new = pool_kv(op, groups)
    want = contiguous_map(op.q_heads, kv_heads)
    if not torch.equal(new.k_map, want):  # a KV head shared by two blocks cannot happen with contiguous blocks
        raise AssertionError(f"{op.info.name}: pooled map {new.k_map.tolist()} is not contiguous")
    return new
