"""dha{kv_ratio}: Decoupled-Head Attention, training-free (METHODS.md card 3; needs calibration).

    k_i = W_k^i x  →  k̃_{π_k(i)} = Σ_{j∈S_g} ω_j R_j W_k^j x,   the same for V with its own groups S'_h, ω', R'

Per site ℓ the number of K heads G_k^ℓ and of V heads G_v^ℓ are chosen independently; query head i
reads key head π_k(i) and value head π_v(i) (arbitrary, non-contiguous maps, gathered by index_select).

1. Statistics: per site the cross-head second moments of K and V on the calibration data.
2. Clustering: for every head count two groupings of the heads on their normalised distance after optimal
   alignment (``rewrite.align.head_distance``): the cut of a Ward tree (scipy) refined by single-head moves,
   and balanced groups (sizes within one, ``align.equal_groups``); the one whose fusion reconstructs the site
   better on calibration data is kept (on the reference decoder the balanced one mostly wins: a Ward cluster
   of many heads pooled into one costs more than it saves).
3. Fusion: generalised Procrustes inside each group (exact re-expression, readers compensate through
   W_q / W_o), then least-squares weights ω = Q⁻¹b minimising Σ_{i∈g} E[(Σ_j ω_j z_j − z_i)ᵀ M_i (…)],
   z = R y, M_i the readers' metric (query second moment for K, W_oᵀW_o for V): a closed form from the moments.
4. Budget: Σ_ℓ G^ℓ = round(kv_ratio × Σ_ℓ H^ℓ), separately for K and V, in the metric of the model's output.
   The error of a site with n heads is e_ℓ(n) = ‖site output − original‖² / ‖site input‖² on the recorded
   inputs of the first PROBE_TOKENS calibration tokens (only that site's K, or V, merged). Its weight s_ℓ
   is measured once: the model's relative output error ε with only that site merged at the uniform share,
   over e_ℓ there. From the uniform shares, single heads move between sites while Σ_ℓ s_ℓ e_ℓ(n_ℓ) drops
   (``balance``); the result is kept only if the model's measured output error beats the uniform shares'.
   ``budget=uniform``: the uniform shares as they are (what a streamed conversion, which never holds the whole
   model, uses; ``rewrite.stream_calib``).
   (Greedy allocation on e_ℓ alone starved the early layers of the reference decoder: +1.0 bpb at 1/4 KV
   against +0.73 for uniform shares.)

Cases handled: MHA and GQA sites, RoPE (2×2 rotations on frequency pairs), partial rotary, biases, sites
already decoupled. Refused: kv_ratio outside (0, 1] (SpecError); no calibration data (PassError).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from rewrite.align import (apply_head_maps, equal_groups, fusion_weights, generalized_procrustes, head_distance,
                           key_pairing, kv_moments, labels_of, reader_metrics, value_pairing)
from rewrite.calibrate import input_grams, record_site_inputs
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import pool_kv
from rewrite.pass_base import Calibration, Diagnostic, Pass, PassResult, register

__all__ = ["DHA", "uniform_shares", "balance", "refine"]

PROBE_TOKENS = 4096  # calibration tokens (whole batches, at least one) whose site inputs measure reconstruction error
OUTPUT_BATCHES = 8  # calibration batches the model-output error of a budget is measured on


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
        """The grouping into n heads (refined Ward cut or balanced groups) that reconstructs the site better."""
        if n not in self._labels:
            if self.h == 1 or n == self.h:
                self._labels[n] = torch.arange(self.h)
                return self._labels[n]
            ward = torch.as_tensor(refine(self._d, cut_tree(self.tree, n_clusters=n)[:, 0]), dtype=torch.long)
            balanced = labels_of(equal_groups(self.dist, n), self.h)
            errors = [self._probe(lab, n) for lab in (ward, balanced)]
            self._labels[n], self._errors[n] = (ward, errors[0]) if errors[0] < errors[1] else (balanced, errors[1])
        return self._labels[n]

    def _fuse(self, lab: torch.Tensor, n: int, iters: int):
        rot = generalized_procrustes(self.c, lab, self.pairing, self.pairwise, self.dist, iters=iters)
        groups = [(lab == g).nonzero().flatten().tolist() for g in range(n)]
        return groups, rot, fusion_weights(self.c, lab, rot, self.metric)

    def fuse(self, n: int, iters: int = 15):
        """(groups, rotations [H, d, d], fusion weights per group) for n merged heads."""
        return self._fuse(self.labels(n), n, iters)

    def _probe(self, lab: torch.Tensor, n: int) -> float:
        groups, rot, w = self._fuse(lab, n, iters=3)
        single = [[j] for j in range(self.op.v_heads if self.kind == "k" else self.op.k_heads)]
        if self.kind == "k":
            new = pool_kv(apply_head_maps(self.op, rot, None), groups, single, k_weights=w)
        else:
            new = pool_kv(apply_head_maps(self.op, None, rot), single, groups, v_weights=w)
        return self.probe(new)

    def error(self, n: int) -> float:
        """Calibration reconstruction error of the site with only these heads merged into n."""
        if n not in self._errors:
            self._errors[n] = self._probe(self.labels(n), n)
        return self._errors[n]


def probe_batches(batches: list) -> list:
    """The first calibration batches holding PROBE_TOKENS tokens (at least one batch)."""
    out, tokens = [], 0
    for b in batches:
        if out and tokens >= PROBE_TOKENS:
            break
        out.append(b)
        first = next(v for v in b.values() if isinstance(v, torch.Tensor))  # input_ids [B, S] or a site's x [B, S, D]
        tokens += first.shape[0] * first.shape[1]
    return out


def uniform_shares(heads: list, ratio: float) -> list:
    """Per site ⌊ratio·H_ℓ⌋ (at least 1), the rest of round(ratio·ΣH) to the largest remainders."""
    total = min(sum(heads), max(len(heads), round(ratio * sum(heads))))
    counts = [min(h, max(1, int(ratio * h))) for h in heads]
    order = sorted(range(len(heads)), key=lambda i: counts[i] - ratio * heads[i])
    for i in order * 2:
        if sum(counts) >= total:
            break
        if counts[i] < heads[i]:
            counts[i] += 1
    return counts


def balance(curves: list, counts: list, weights: list) -> list:
    """Move one head at a time from the site where it costs least to the one where it gains most, while the
    predicted cost Σ_ℓ s_ℓ e_ℓ(n_ℓ) drops."""
    n = list(counts)
    cost = lambda i, m: weights[i] * curves[i].error(m)  # noqa: E731
    for _ in range(2 * sum(cv.h for cv in curves)):
        gain = {i: cost(i, n[i]) - cost(i, n[i] + 1) for i in range(len(n)) if n[i] < curves[i].h}
        loss = {i: cost(i, n[i] - 1) - cost(i, n[i]) for i in range(len(n)) if n[i] > 1}
        moves = [(gain[b] - loss[a], a, b) for a in loss for b in gain if a != b]
        if not moves or max(moves)[0] <= 1e-12:
            break
        _, a, b = max(moves)
        n[a] -= 1
        n[b] += 1
    return n


@register
@dataclasses.dataclass(frozen=True)
class DHA(Pass):
    """Decoupled-head KV merging under a global budget (see the module docstring)."""

    name = "dha"
    needs_calibration = True
    kv_ratio: Optional[float] = None
    budget: str = "output"  # "output": K/V budgets moved by the model's measured output error | "uniform"

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    def check_options(self) -> None:
        if self.kv_ratio is None or not 0 < self.kv_ratio <= 1:
            raise SpecError(f"dha{{kv_ratio={self.kv_ratio}}}: kv_ratio must be in (0, 1], the fraction of KV "
                            "heads kept, e.g. dha{kv_ratio=0.5}")
        if self.budget not in ("output", "uniform"):
            raise SpecError(f"dha{{budget={self.budget}}}: budget must be 'output' or 'uniform'")

    # the head budget is shared by all sites; streamed, it is read off the head counts alone
    calibration = Calibration(("input_gram", "site_inputs"), "model", gather_reads_inputs=False)

    def run(self, gm, ctx):
        ops = sites(gm)
        with torch.no_grad():
            k_curves, v_curves = self._curves(gm, ctx)
            if self.budget == "uniform":
                nk, nv, chosen = _uniform(ops, self.kv_ratio) + ("uniform shares",)
            else:
                output_error = _output_error(gm, ctx, ctx.calibration[:OUTPUT_BATCHES])
                nk, nv, chosen = _allocate(ops, k_curves, v_curves, self.kv_ratio, output_error)
        return self._fused(gm, k_curves, v_curves, nk, nv, chosen)

    def _curves(self, gm, ctx) -> tuple:
        """Per site, the K and V FusionCurves."""
        if not ctx.calibration:
            raise PassError(f"{self.spec()} needs calibration data to fuse heads; pass calibration=[batches, ...]")
        stats = input_grams(gm, ctx.call(gm), ctx.calibration, track=ctx.track)
        records = record_site_inputs(gm, ctx.call(gm), probe_batches(ctx.calibration))
        with torch.no_grad():
            k_curves, v_curves = [], []
            for op, st, rec in zip(sites(gm), stats, records):
                probe = _site_probe(op, rec)
                ck, cv = kv_moments(op, st)
                k_metric, v_metric = reader_metrics(op, st)  # Σ E[q qᵀ], Σ W_oᵀ W_o
                k_curves.append(FusionCurve(op, "k", ck, k_metric, probe))
                v_curves.append(FusionCurve(op, "v", cv, v_metric, probe))
        return k_curves, v_curves

    def _fused(self, gm, k_curves, v_curves, nk, nv, chosen: str) -> PassResult:
        ops = sites(gm)
        replace, per_site = {}, {}
        with torch.no_grad():
            for i, op in enumerate(ops):
                if nk[i] < op.k_heads or nv[i] < op.v_heads:
                    replace[i], per_site[op.info.name] = _fuse(op, k_curves[i], v_curves[i], nk[i], nv[i])
        note = Diagnostic("info", f"K heads per site {nk} (of {[op.k_heads for op in ops]}), V heads per site {nv} "
                                  f"(of {[op.v_heads for op in ops]}); {chosen}")
        return PassResult(with_sites(gm, replace), bool(replace), per_site, [note])

    # streamed in two sweeps (rewrite.stream_calib): the head counts, one allocation, fusion per site. A streamed
    # conversion never holds the whole model, so it cannot measure the model's output: uniform shares.
    def gather(self, gm, ctx) -> list:
        """Per site, what the streamed budget reads: its K and V head counts."""
        return [{"k": op.k_heads, "v": op.v_heads} for op in sites(gm)]

    def decide(self, gathered: list, ops: list) -> tuple:
        """((K heads, V heads) per site, diagnostics): uniform shares of the budget."""
        nk, nv = _uniform(ops, self.kv_ratio)
        why = "uniform shares" + ("" if self.budget == "uniform" else
                                  " (budget=output needs the whole model's output, which a streamed conversion "
                                  "never holds; use budget=uniform to say so, or convert in memory)")
        note = Diagnostic("info", f"K heads per site {nk} (of {[op.k_heads for op in ops]}), V heads per site {nv} "
                                  f"(of {[op.v_heads for op in ops]}); {why}")
        return [[a, b] for a, b in zip(nk, nv)], [note]

    def apply(self, gm, ctx, plan: list) -> PassResult:
        """Fuse the one site of ``gm`` into the decided (K heads, V heads) ``plan``."""
        k_curves, v_curves = self._curves(gm, ctx)
        result = self._fused(gm, k_curves, v_curves, [plan[0]], [plan[1]], "")
        result.diagnostics = []  # decide's note covers every site
        return result


def _uniform(ops, ratio: float) -> tuple:
    return (uniform_shares([op.k_heads for op in ops], ratio), uniform_shares([op.v_heads for op in ops], ratio))


def _first_float(out) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return leaves[0].double()


def _output_error(gm, ctx, batches):
    """``error(replace)``: Σ‖y − y₀‖² / Σ‖y₀‖² of the model's first output with the sites ``replace`` swapped in."""
    refs = [_first_float(ctx.call(gm)(kw)) for kw in batches]
    energy = sum(float(r.pow(2).sum()) for r in refs) or 1.0

    def error(replace: dict) -> float:
        call = ctx.call(with_sites(gm, replace))
        return sum(float((_first_float(call(kw)) - r).pow(2).sum()) for kw, r in zip(batches, refs)) / energy
    return error


def _allocate(ops, k_curves, v_curves, ratio: float, output_error):
    """(K heads, V heads per site, which allocation won): uniform shares, or ``balance`` by measured weights."""
    nk0 = uniform_shares([op.k_heads for op in ops], ratio)
    nv0 = uniform_shares([op.v_heads for op in ops], ratio)
    single = lambda i, nk, nv: output_error({i: _fuse(ops[i], k_curves[i], v_curves[i], nk, nv, iters=3)[0]})  # noqa: E731
    wk = [single(i, nk0[i], op.v_heads) / max(k_curves[i].error(nk0[i]), 1e-30) if nk0[i] < op.k_heads else 0.0
          for i, op in enumerate(ops)]
    wv = [single(i, op.k_heads, nv0[i]) / max(v_curves[i].error(nv0[i]), 1e-30) if nv0[i] < op.v_heads else 0.0
          for i, op in enumerate(ops)]
    nk, nv = balance(k_curves, nk0, wk), balance(v_curves, nv0, wv)
    if (nk, nv) == (nk0, nv0):
        return nk0, nv0, "uniform shares"

    def total(nks, nvs):
        return output_error({i: _fuse(op, k_curves[i], v_curves[i], nks[i], nvs[i], iters=3)[0]
                             for i, op in enumerate(ops) if nks[i] < op.k_heads or nvs[i] < op.v_heads})
    e0, e1 = total(nk0, nv0), total(nk, nv)
    if e1 < e0:
        return nk, nv, f"balanced shares (model output error {e1:.3g} against {e0:.3g} for uniform shares)"
    return nk0, nv0, f"uniform shares (model output error {e0:.3g}; balanced shares gave {e1:.3g})"


def _site_probe(op, records):
    refs = [op(*r.args) for r in records]
    x_energy = sum(float(r.x.double().pow(2).sum()) for r in records) or 1.0

    def error(new_op) -> float:
        return sum(float((new_op(*r.args).double() - y.double()).pow(2).sum()) for r, y in zip(records, refs)) / x_energy
    return error


def _fuse(op, k_curve: FusionCurve, v_curve: FusionCurve, nk: int, nv: int, iters: int = 15):
    gk, rk, wk = k_curve.fuse(nk, iters)
    gv, rv, wv = v_curve.fuse(nv, iters)
    new = pool_kv(apply_head_maps(op, rk, rv), gk, gv, k_weights=wk, v_weights=wv)
    return new, {"k_heads_before": op.k_heads, "k_heads_after": nk, "v_heads_before": op.v_heads,
                 "v_heads_after": nv, "k_groups": gk, "v_groups": gv,
                 "k_error": round(k_curve.error(nk), 5), "v_error": round(v_curve.error(nv), 5)}
