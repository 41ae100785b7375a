"""dha{kv_ratio}: Decoupled-Head Attention, training-free (METHODS.md card 3; needs calibration).

    k_i = W_k^i x  →  k̃_{π_k(i)} = Σ_{j∈S_g} ω_j R_j W_k^j x,   the same for V with its own groups S'_h, ω', R'

Per site ℓ the number of K heads G_k^ℓ and of V heads G_v^ℓ are chosen independently; query head i
reads key head π_k(i) and value head π_v(i) (arbitrary, non-contiguous maps, gathered by index_select).

1. Statistics: per site the cross-head second moments of K and V on the calibration data.
2. Clustering: Ward hierarchical clustering (scipy) of the heads on their normalised distance after
   optimal alignment (``rewrite.align.head_distance``); cutting the tree gives a grouping for every head
   count, refined by single-head moves.
3. Fusion: generalised Procrustes inside each group (exact re-expression, readers compensate through
   W_q / W_o), then least-squares weights ω = Q⁻¹b minimising Σ_{i∈g} E[(Σ_j ω_j z_j − z_i)ᵀ M_i (…)],
   z = R y, M_i the readers' metric (query second moment for K, W_oᵀW_o for V): a closed form from the moments.
4. Budget: Σ_ℓ G^ℓ = round(kv_ratio × Σ_ℓ H^ℓ), separately for K and V. Every site starts at one head; the
   next head goes to the site whose calibration reconstruction error drops most (greedy). The error of a
   site with n heads is ‖site output − original site output‖² / ‖site input‖² on the recorded inputs of the
   first PROBE_BATCHES calibration batches (only that site's K, or V, merged). On MiniLM this puts the
   budget where the output feels it (the last layer keeps most heads) and beats uniform budgets by far.

Cases handled: MHA and GQA sites, RoPE (2×2 rotations on frequency pairs), partial rotary, biases, sites
already decoupled. Refused: kv_ratio outside (0, 1] (SpecError); no calibration data (PassError).
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from rewrite.align import (apply_head_maps, generalized_procrustes, head_distance, head_self_moments, key_pairing,
                           kv_moments, reader_sum, value_pairing)
from rewrite.calibrate import input_grams, record_site_inputs
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import pool_kv
from rewrite.pass_base import Calibration, Diagnostic, Pass, PassResult, register

__all__ = ["DHA", "allocate", "refine", "fusion_weights"]

PROBE_BATCHES = 16  # calibration batches whose site inputs are kept to measure reconstruction error


def refine(dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Move single heads between groups while J = Σ_g S_g / (2|g|), S_g = Σ_{i,j∈g} d_ij, decreases."""
    lab = labels.astype(np.int64).copy()
    h, n = len(lab), int(lab.max()) + 1
    rows = np.arange(h)
    for _ in range(4 * h):
        onehot = np.eye(n)[lab]
        s = dist @ onehot  # s[x, g] = Σ_{k∈g} d_xk
        size, total = onehot.sum(0), np.einsum("ig,ij,jg->g", onehot, dist, onehot)
        sa, na = total[lab], size[lab]
        # x leaves its group a (S_a − 2 s[x,a] over |a| − 1) and joins b (S_b + 2 s[x,b] over |b| + 1)
        leave = np.where(na > 1, (sa - 2 * s[rows, lab]) / (2 * np.maximum(na - 1, 1)), np.inf) - sa / (2 * na)
        delta = leave[:, None] + (total + 2 * s) / (2 * (size + 1)) - total / (2 * size)
        delta[rows, lab] = 0
        x, b = np.unravel_index(np.argmin(delta), delta.shape)
        if not delta[x, b] < -1e-12 * max(float(total.sum()), 1e-30):
            break
        lab[x] = b
    return lab


def fusion_weights(c: torch.Tensor, labels: torch.Tensor, rot: torch.Tensor, metric: torch.Tensor) -> list:
    """Per group the ω minimising Σ_{i∈g} E[(Σ_j ω_j z_j − z_i)ᵀ M_i (…)], z = R y (one list per group)."""
    cr = torch.einsum("jab,jlbc,ldc->jlad", rot, c, rot)  # E[z_j z_lᵀ]
    mr = rot @ metric @ rot.transpose(-1, -2)  # M_i in aligned coordinates
    t = torch.einsum("iab,jlba->ijl", mr, cr)  # t[i, j, l] = E[z_lᵀ M_i z_j]
    out = []
    for g in range(int(labels.max()) + 1):
        idx = (labels == g).nonzero().flatten()
        sub = t[idx][:, idx][:, :, idx]
        q = sub.sum(0)  # q[j, l] = Σ_i E[z_lᵀ M_i z_j]
        b = sub.diagonal(dim1=0, dim2=2).sum(-1)  # b[j] = Σ_i E[z_iᵀ M_i z_j]
        ridge = 1e-9 * q.diagonal().mean().clamp_min(1e-30) * torch.eye(len(idx), dtype=q.dtype)
        out.append(torch.linalg.solve(q + ridge, b).tolist())
    return out


class FusionCurve:
    """One site's K (or V) heads: a grouping for every head count n, its fusion, and its calibration error."""

    def __init__(self, op, kind: str, c, metric, probe):
        self.op, self.kind, self.c, self.metric, self.probe = op, kind, c, metric, probe
        self.pairing = key_pairing(op) if kind == "k" else value_pairing(op)
        self.h = c.shape[0]
        dist, self.pairwise = head_distance(c, self.pairing)
        self.dist = dist
        d = ((dist + dist.T) / 2).numpy()
        np.fill_diagonal(d, 0)
        self._d = d
        # Ward on √d merges so as to least increase Σ_g (1/|g|) Σ_{i<j∈g} d_ij
        self.tree = linkage(squareform(np.sqrt(d), checks=False), "ward") if self.h > 1 else None
        self._errors, self._labels = {self.h: 0.0}, {}  # every head kept: nothing merged

    def labels(self, n: int) -> torch.Tensor:
        """The refined Ward cut into n groups."""
        if n not in self._labels:
            lab = cut_tree(self.tree, n_clusters=n)[:, 0] if self.h > 1 else np.zeros(1, dtype=np.int64)
            self._labels[n] = torch.as_tensor(refine(self._d, lab), dtype=torch.long)
        return self._labels[n]

    def fuse(self, n: int, iters: int = 15):
        """(groups, rotations [H, d, d], fusion weights per group) for n merged heads."""
        lab = self.labels(n)
        rot = generalized_procrustes(self.c, lab, self.pairing, self.pairwise, self.dist, iters=iters)
        groups = [(lab == g).nonzero().flatten().tolist() for g in range(n)]
        return groups, rot, fusion_weights(self.c, lab, rot, self.metric)

    def error(self, n: int) -> float:
        """Calibration reconstruction error of the site with only these heads merged into n."""
        if n not in self._errors:
            groups, rot, w = self.fuse(n, iters=3)
            single = [[j] for j in range(self.op.v_heads if self.kind == "k" else self.op.k_heads)]
            if self.kind == "k":
                new = pool_kv(apply_head_maps(self.op, rot, None), groups, single, k_weights=w)
            else:
                new = pool_kv(apply_head_maps(self.op, None, rot), single, groups, v_weights=w)
            self._errors[n] = self.probe(new)
        return self._errors[n]


def allocate(curves: list, budget: int) -> list:
    """Head counts per site: start at 1, give each next head to the largest error drop (greedy)."""
    if budget >= sum(cv.h for cv in curves):
        return [cv.h for cv in curves]
    counts = [1] * len(curves)
    heap = [(-(cv.error(1) - cv.error(2)), i) for i, cv in enumerate(curves) if cv.h > 1]
    heapq.heapify(heap)
    for _ in range(budget - len(curves)):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        counts[i] += 1
        n, cv = counts[i], curves[i]
        if n < cv.h:
            heapq.heappush(heap, (-(cv.error(n) - cv.error(n + 1)), i))
    return counts


@register
@dataclasses.dataclass(frozen=True)
class DHA(Pass):
    """Decoupled-head KV merging under a global budget (see the module docstring)."""

    name = "dha"
    needs_calibration = True
    kv_ratio: Optional[float] = None

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    def check_options(self) -> None:
        if self.kv_ratio is None or not 0 < self.kv_ratio <= 1:
            raise SpecError(f"dha{{kv_ratio={self.kv_ratio}}}: kv_ratio must be in (0, 1], the fraction of KV "
                            "heads kept, e.g. dha{kv_ratio=0.5}")

    calibration = Calibration(("input_gram", "site_inputs"), "model")  # the head budget is shared by all sites

    def run(self, gm, ctx):
        ops = sites(gm)
        with torch.no_grad():
            k_curves, v_curves = self._curves(gm, ctx)
            nk = allocate(k_curves, max(len(ops), round(self.kv_ratio * sum(op.k_heads for op in ops))))
            nv = allocate(v_curves, max(len(ops), round(self.kv_ratio * sum(op.v_heads for op in ops))))
        return self._fused(gm, k_curves, v_curves, nk, nv)

    def _curves(self, gm, ctx) -> tuple:
        """Per site, the K and V FusionCurves."""
        if not ctx.calibration:
            raise PassError(f"{self.spec()} needs calibration data to fuse heads; pass calibration=[batches, ...]")
        stats = input_grams(gm, ctx.call(gm), ctx.calibration, track=ctx.track)
        records = record_site_inputs(gm, ctx.call(gm), ctx.calibration[:PROBE_BATCHES])
        with torch.no_grad():
            k_curves, v_curves = [], []
            for op, st, rec in zip(sites(gm), stats, records):
                probe = _site_probe(op, rec)
                ck, cv = kv_moments(op, st)
                wo = op.wo.detach().double().permute(1, 0, 2)  # (Hq, Do, dv)
                k_metric = reader_sum(head_self_moments(op.wq, op.bq, st), op.k_map, op.k_heads)  # Σ E[q qᵀ]
                v_metric = reader_sum(wo.transpose(1, 2) @ wo, op.v_map, op.v_heads)  # Σ W_oᵀ W_o
                k_curves.append(FusionCurve(op, "k", ck, k_metric, probe))
                v_curves.append(FusionCurve(op, "v", cv, v_metric, probe))
        return k_curves, v_curves

    def _fused(self, gm, k_curves, v_curves, nk, nv) -> PassResult:
        ops = sites(gm)
        replace, per_site = {}, {}
        with torch.no_grad():
            for i, op in enumerate(ops):
                if nk[i] < op.k_heads or nv[i] < op.v_heads:
                    replace[i], per_site[op.info.name] = _fuse(op, k_curves[i], v_curves[i], nk[i], nv[i])
        note = Diagnostic("info", f"K heads per site {nk} (of {[op.k_heads for op in ops]}), V heads per site {nv} "
                                  f"(of {[op.v_heads for op in ops]})")
        return PassResult(with_sites(gm, replace), bool(replace), per_site, [note])

    # streamed in two sweeps (rewrite.stream_layers): every error curve, one allocation, fusion per site
    def gather(self, gm, ctx) -> list:
        """Per site, its K and V error curves: error(n) for n = 1..heads (the allocation reads no more)."""
        k_curves, v_curves = self._curves(gm, ctx)
        with torch.no_grad():
            return [{"k": [ck.error(n) for n in range(1, ck.h + 1)], "v": [cv.error(n) for n in range(1, cv.h + 1)]}
                    for ck, cv in zip(k_curves, v_curves)]

    def decide(self, gathered: list, ops: list) -> tuple:
        """((K heads, V heads) per site, diagnostics), the allocation ``run`` makes, from the gathered curves."""
        k_budget = max(len(ops), round(self.kv_ratio * sum(op.k_heads for op in ops)))
        v_budget = max(len(ops), round(self.kv_ratio * sum(op.v_heads for op in ops)))
        nk = allocate([_Curve(g["k"]) for g in gathered], k_budget)
        nv = allocate([_Curve(g["v"]) for g in gathered], v_budget)
        note = Diagnostic("info", f"K heads per site {nk} (of {[op.k_heads for op in ops]}), V heads per site {nv} "
                                  f"(of {[op.v_heads for op in ops]})")
        return [[a, b] for a, b in zip(nk, nv)], [note]

    def apply(self, gm, ctx, plan: list) -> PassResult:
        """Fuse the one site of ``gm`` into the decided (K heads, V heads) ``plan``."""
        k_curves, v_curves = self._curves(gm, ctx)
        result = self._fused(gm, k_curves, v_curves, [plan[0]], [plan[1]])
        result.diagnostics = []  # decide's note covers every site
        return result


class _Curve:
    """An error curve read from a table (error(n) = table[n - 1]), for ``allocate``."""

    def __init__(self, table: list):
        self.h, self.table = len(table), table

    def error(self, n: int) -> float:
        return self.table[n - 1]


def _site_probe(op, records):
    refs = [op(*r.args) for r in records]
    x_energy = sum(float(r.x.double().pow(2).sum()) for r in records) or 1.0

    def error(new_op) -> float:
        return sum(float((new_op(*r.args).double() - y.double()).pow(2).sum()) for r, y in zip(records, refs)) / x_energy
    return error


def _fuse(op, k_curve: FusionCurve, v_curve: FusionCurve, nk: int, nv: int):
    gk, rk, wk = k_curve.fuse(nk)
    gv, rv, wv = v_curve.fuse(nv)
    new = pool_kv(apply_head_maps(op, rk, rv), gk, gv, k_weights=wk, v_weights=wv)
    return new, {"k_heads_before": op.k_heads, "k_heads_after": nk, "v_heads_before": op.v_heads,
                 "v_heads_after": nv, "k_groups": gk, "v_groups": gv,
                 "k_error": round(k_curve.error(nk), 5), "v_error": round(v_curve.error(nv), 5)}
