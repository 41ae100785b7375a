"""dha{kv_ratio}: Decoupled-Head Attention, training-free (METHODS.md card 3; needs calibration).

    k_i = T_k^{π_k(i)} … → k̃_g = Σ_{j∈S_g} ω_j R_j W_k^j x,   ṽ_h = Σ_{j∈S'_h} ω'_j R_j W_v^j x

Per site ℓ the number of K heads G_k^ℓ and of V heads G_v^ℓ are chosen independently; query head i
reads key head π_k(i) and value head π_v(i), arbitrary (non-contiguous) maps.

1. Statistics: per site the cross-head second moments of K and V (``rewrite.align.kv_moments``).
2. Clustering: average-linkage hierarchical clustering (scipy) of the heads on their distance after
   optimal alignment, min_R E‖R y_i − y_j‖²; cutting the tree gives a grouping for every head count.
3. Budget: Σ_ℓ G^ℓ = round(kv_ratio × Σ_ℓ H^ℓ), separately for K and V; every site starts at one head and
   the next head goes to the site whose fusion error (relative to its head energy) drops the most (greedy).
4. Fusion: generalised Procrustes inside each group (exact re-expression, readers compensate), then the
   least-squares fusion weights ω = Q⁻¹b minimising Σ_{i∈g} E‖M_i^{1/2}(Σ_j ω_j z_j − z_i)‖², with
   M_i the readers' metric (W_oᵀW_o for V, the query second moment for K), closed form from the moments.

Cases handled: MHA and GQA sites, RoPE (2×2 rotations on frequency pairs), biases, sites already
decoupled. Refused: kv_ratio outside (0, 1] (SpecError); no calibration data (PassError).
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from rewrite.align import (_diag_moments, _reader_sum, aligned_distance, apply_head_maps, generalized_procrustes,
                           group_residual, kv_moments)
from rewrite.calibrate import input_grams
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import pool_kv
from rewrite.pass_base import Pass, PassResult, register

__all__ = ["DHA", "allocate"]


class FusionCurve:
    """Fusion error of one site's K (or V) heads for every head count n, evaluated lazily."""

    def __init__(self, c: torch.Tensor, pairing):
        self.c, self.pairing, self.h = c, pairing, c.shape[0]
        self.energy = float(torch.einsum("iiaa->", c)) + 1e-30
        dist = aligned_distance(c, pairing).numpy()
        self.dist = (dist + dist.T) / 2
        np.fill_diagonal(self.dist, 0)
        # Ward on √d merges so as to least increase Σ_g (1/|g|) Σ_{i<j∈g} d_ij, the pooling residual
        self.tree = linkage(squareform(np.sqrt(self.dist), checks=False), "ward") if self.h > 1 else None
        self._errors, self._labels = {self.h: 0.0}, {}

    def labels(self, n: int) -> torch.Tensor:
        if n not in self._labels:
            lab = cut_tree(self.tree, n_clusters=n)[:, 0] if self.h > 1 else np.zeros(1, dtype=np.int64)
            self._labels[n] = torch.as_tensor(refine(self.dist, lab), dtype=torch.long)
        return self._labels[n]

    def error(self, n: int) -> float:
        """Relative residual Σ_m E‖t_g − R_m y_m‖² / Σ_m E‖y_m‖² of aligned mean-pooling into n heads."""
        if n not in self._errors:
            lab = self.labels(n)
            rot = generalized_procrustes(self.c, lab, self.pairing, iters=8)
            self._errors[n] = group_residual(self.c, lab, rot) / self.energy
        return self._errors[n]


def refine(dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Move single heads between groups while J = Σ_g S_g / (2|g|), S_g = Σ_{i,j∈g} d_ij, decreases."""
    lab = labels.astype(np.int64).copy()
    h, n = len(lab), int(lab.max()) + 1
    for _ in range(4 * h):
        onehot = np.eye(n)[lab]
        s = dist @ onehot  # s[x, g] = Σ_{k∈g} d_xk
        size = onehot.sum(0)
        big = onehot.T @ dist @ onehot
        total = big.diagonal()  # S_g
        own = lab
        # removing x from its group a: S_a − 2 s[x,a] over |a| − 1; adding it to b: S_b + 2 s[x,b] over |b| + 1
        sa, na = total[own], size[own]
        after_a = np.where(na > 1, (sa - 2 * s[np.arange(h), own]) / (2 * np.maximum(na - 1, 1)), np.inf)
        delta = (after_a - sa / (2 * na))[:, None] + (total + 2 * s) / (2 * (size + 1)) - total / (2 * size)
        delta[np.arange(h), own] = 0
        x, b = np.unravel_index(np.argmin(delta), delta.shape)
        if not delta[x, b] < -1e-12 * max(float(total.sum()), 1e-30):
            break
        lab[x] = b
    return lab


def allocate(curves: list, budget: int) -> list:
    """Head counts per site: start at 1, give each next head to the largest error drop (greedy)."""
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


def fusion_weights(c: torch.Tensor, labels: torch.Tensor, rot: torch.Tensor, metric: torch.Tensor) -> list:
    """Per group the ω minimising Σ_{i∈g} E[(Σ_j ω_j z_j − z_i)ᵀ M_i (…)] with z = R y; one list per group."""
    cr = torch.einsum("jab,jlbc,ldc->jlad", rot, c, rot)  # E[z_j z_lᵀ]
    mr = rot @ metric @ rot.transpose(-1, -2)  # the metric in aligned coordinates
    t = torch.einsum("iab,jlba->ijl", mr, cr)  # t[i, j, l] = E[z_lᵀ M_i z_j]
    out = []
    for g in range(int(labels.max()) + 1):
        idx = (labels == g).nonzero().flatten()
        sub = t[idx][:, idx][:, :, idx]
        q = sub.sum(0)  # q[j, l] = Σ_i E[z_lᵀ M_i z_j]
        b = sub.diagonal(dim1=0, dim2=2).sum(-1)  # b[j] = Σ_i E[z_iᵀ M_i z_j]
        ridge = 1e-9 * q.diagonal().mean().clamp_min(1e-30)
        out.append(torch.linalg.solve(q + ridge * torch.eye(len(idx), dtype=q.dtype), b).tolist())
    return out


def _groups(labels: torch.Tensor) -> list:
    return [(labels == g).nonzero().flatten().tolist() for g in range(int(labels.max()) + 1)]


@register
@dataclasses.dataclass(frozen=True)
class DHA(Pass):
    """Decoupled-head KV merging under a global budget (see the module docstring)."""

    name = "dha"
    needs_calibration = True
    kv_ratio: Optional[float] = None

    def check_options(self) -> None:
        if self.kv_ratio is None or not 0 < self.kv_ratio <= 1:
            raise SpecError(f"dha{{kv_ratio={self.kv_ratio}}}: kv_ratio must be in (0, 1], the fraction of KV "
                            "heads kept, e.g. dha{kv_ratio=0.5}")

    def run(self, gm, ctx):
        self.check_options()
        if not ctx.calibration:
            raise PassError(f"{self.spec()} needs calibration data to fuse heads; pass calibration=[batches, ...]")
        ops = sites(gm)
        stats = input_grams(gm, ctx.call(gm), ctx.calibration, track=ctx.track)
        with torch.no_grad():
            moms = [kv_moments(op, st) for op, st in zip(ops, stats)]
            k_curves = [FusionCurve(m.ck, m.kp) for m in moms]
            v_curves = [FusionCurve(m.cv, m.vp) for m in moms]
            nk = allocate(k_curves, max(len(ops), round(self.kv_ratio * sum(op.k_heads for op in ops))))
            nv = allocate(v_curves, max(len(ops), round(self.kv_ratio * sum(op.v_heads for op in ops))))
            replace, per_site = {}, {}
            for i, (op, st, m) in enumerate(zip(ops, stats, moms)):
                if nk[i] == op.k_heads and nv[i] == op.v_heads:
                    continue
                replace[i], per_site[op.info.name] = self._fuse(op, st, m, k_curves[i], v_curves[i], nk[i], nv[i])
        return PassResult(with_sites(gm, replace), bool(replace), per_site, [])

    @staticmethod
    def _fuse(op, st, mom, k_curve, v_curve, nk, nv):
        lk, lv = k_curve.labels(nk), v_curve.labels(nv)
        rk = generalized_procrustes(mom.ck, lk, mom.kp)
        rv = generalized_procrustes(mom.cv, lv, mom.vp)
        wo = op.wo.detach().double().permute(1, 0, 2)  # (Hq, Do, dv)
        v_metric = _reader_sum(wo.transpose(1, 2) @ wo, op.v_map, op.v_heads)
        k_metric = _reader_sum(_diag_moments(op.wq.detach(), op.bq, st), op.k_map, op.k_heads)
        wk = fusion_weights(mom.ck, lk, rk, k_metric)
        wv = fusion_weights(mom.cv, lv, rv, v_metric)
        aligned = apply_head_maps(op, rk, rv)
        gk, gv = _groups(lk), _groups(lv)
        new = pool_kv(aligned, gk, gv, k_weights=wk, v_weights=wv)
        return new, {"k_heads_before": op.k_heads, "k_heads_after": nk, "v_heads_before": op.v_heads,
                     "v_heads_after": nv, "k_groups": gk, "v_groups": gv,
                     "k_error": round(k_curve.error(nk), 4), "v_error": round(v_curve.error(nv), 4)}
