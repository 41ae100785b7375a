"""MASA: Matrix Atom Sharing across layers (Zhussip et al., arXiv 2508.04581; METHODS.md card 6).

    W_ℓ^P ≈ Σ_{s=1..S} c_ℓs^P · D_s^P     for each projection type P ∈ {Q, K, V, O}, one dictionary per group

Training-free "matrix PCA": with W = [vec W_1 … vec W_L] (uncentred), WᵀW = V Λ Vᵀ (an L×L
eigenproblem), atoms D = W V_S Λ_S^{-1/2} (orthonormal under ⟨·,·⟩_F) and c_ℓs = ⟨D_s, W_ℓ⟩,
stored as D_s·√λ_s and c_ℓs/√λ_s (the same W_ℓ, but atoms on the weights' scale for distillation).
Exact when S ≥ rank W, e.g. S = the group's size (``atoms`` unset). Every site of a group reads
one ``SharedAtoms`` module per projection type (counted once); its ``AtomWeights`` provider
rebuilds W_ℓ once per forward (``Attention.use_weights``). Biases stay per layer.

Local refinement (``refine_rank=r`` > 0; needs calibration), per layer ℓ and shared type, SVD-LLM style
(``refine_alloc=adaptive``, the default: the per-type total of the ranks below, moved to the layers whose
relative whitened error it lowers most, i.e. the largest s_k/‖W_ℓ L_ℓ‖ over all layers; on the reference
decoder +0.90 → +0.18 bpb for atoms=2, refine_rank=8; ``refine_alloc=uniform``: the ranks below in every layer):

    W'_ℓ = Ŵ_ℓ + A_ℓ B_ℓ,  (W_ℓ − Ŵ_ℓ) L_ℓ = U S Vᵀ,  A_ℓ = U_r S_r^½,  B_ℓ = S_r^½ V_rᵀ L_ℓ⁻¹,  L_ℓ L_ℓᵀ = Σxxᵀ + εI
    r_Q = r_O = r,  r_K = ⌈r·Hk/Hq⌉,  r_V = ⌈r·Hv/Hq⌉  (each at most min(out, in))

on the [out, in] matrix a projection applies (wq [H,dh,D] as [H·dh, D], wo [Do,Hq,dv] as [Do, Hq·dv]); Σxxᵀ
(fp64, padding left out) is over its calibration input: x for Q, the key/value input for K and V, the (gated)
per-head attention outputs for O. A B is the best rank-r fit of the residual in ‖(·)L‖_F, the error on those
activations; full rank restores W_ℓ. A_ℓ, B_ℓ are the site's own Parameters in its ``AtomWeights``.

Cases handled:
  1. ``group=all``: one dictionary per projection type over every site.
  2. ``group=auto``: consecutive sites grouped by low drift (cosine distance of the token-averaged
     site inputs of consecutive sites on calibration data); a group smaller than ``atoms + 1`` joins
     its neighbour across the smaller drift.
Refused:
  1. ``atoms < 1``, ``refine_rank`` not an int ≥ 0 or an unknown ``group`` (SpecError).
  2. ``atoms`` larger than a group ("atoms=7 exceeds the 6 layers of group 0-5", SpecError).
  3. Weights of one type whose shapes differ within a group: that type of that group stays per layer (Diagnostic).
  4. ``refine_rank`` > 0 or ``group=auto`` without calibration data (PassError).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Optional

import torch
from torch import nn

from rewrite.calibrate import InputStats, real_keys, record_site_inputs
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import rebuild
from rewrite.ir import WEIGHT_NAMES
from rewrite.pass_base import Calibration, Diagnostic, Pass, PassResult, register

__all__ = ["Masa", "SharedAtoms", "AtomWeights", "matrix_pca"]

RANK_TOL = 1e-12  # eigenvalues below this fraction of the largest are null directions
RIDGE = 1e-6  # added to Σxxᵀ before Cholesky, relative to its mean diagonal: always positive definite
EXACT = 1e-6  # whitened relative residual below which a weight is not refined (rank 0)
INPUT_OF = {"wq": "x", "wk": "kv", "wv": "kv", "wo": "o"}  # which calibration input each projection reads


class SharedAtoms(nn.Module):
    """S atoms ``[S, *shape]`` shared by the L layers of a group, with coefficients ``[L, S]``."""

    def __init__(self, atoms: torch.Tensor, coefficients: torch.Tensor):
        super().__init__()
        self.atoms = nn.Parameter(atoms)
        self.coefficients = nn.Parameter(coefficients)

    def forward(self, layer: int) -> torch.Tensor:
        return torch.tensordot(self.coefficients[layer], self.atoms, dims=1)  # Σ_s c_ℓs D_s


class AtomWeights(nn.Module):
    """One site's ``(wq, wk, wv, wo)``: a group's atoms (+ the site's own refinement A B) or own Parameters."""

    def __init__(self, shared: dict, layers: dict, own: dict, refine: Optional[dict] = None):
        super().__init__()
        self.shared = nn.ModuleDict(shared)  # name -> SharedAtoms (the same module in every site of the group)
        self.layers = dict(layers)  # name -> this site's row in the coefficients
        self.own = nn.ParameterDict({n: nn.Parameter(w.detach().clone()) for n, w in own.items()})
        # name_a [out, r], name_b [r, in]: this site's own factors, W' = Ŵ + A B on the weight's matrix view
        self.refine = nn.ParameterDict({f"{n}_{k}": nn.Parameter(t.detach().clone())
                                        for n, ab in (refine or {}).items() for k, t in zip("ab", ab)})

    def to_spec(self, groups: dict) -> dict:
        """Shapes and the shared groups by number (``groups``: id(SharedAtoms) -> number, filled here)."""
        shared = {}
        for n, atoms in self.shared.items():
            key = groups.setdefault(id(atoms), (len(groups), atoms))[0]
            shared[n] = {"group": key, "atoms": list(atoms.atoms.shape), "coefficients": list(atoms.coefficients.shape)}
        return {"shared": shared, "layers": dict(self.layers),
                "own": {n: list(w.shape) for n, w in self.own.items()},
                "refine": {n: list(t.shape) for n, t in self.refine.items()}}

    @classmethod
    def from_spec(cls, spec: dict, groups: dict, **_) -> "AtomWeights":
        """Uninitialised weights of these shapes; sites naming the same group share one ``SharedAtoms``."""
        shared = {}
        for n, g in spec["shared"].items():
            if g["group"] not in groups:
                groups[g["group"]] = SharedAtoms(torch.zeros(g["atoms"]), torch.zeros(g["coefficients"]))
            shared[n] = groups[g["group"]]
        new = cls(shared, spec["layers"], {n: torch.zeros(s) for n, s in spec["own"].items()})
        new.refine = nn.ParameterDict({n: nn.Parameter(torch.zeros(s)) for n, s in spec["refine"].items()})
        return new

    def forward(self):
        return tuple(self._weight(n) for n in WEIGHT_NAMES)

    def _weight(self, name: str) -> torch.Tensor:
        if name not in self.shared:
            return self.own[name]
        w = self.shared[name](self.layers[name])
        if f"{name}_a" in self.refine:
            w = w + (self.refine[f"{name}_a"] @ self.refine[f"{name}_b"]).reshape(w.shape)
        return w


def matrix_pca(weights: list, atoms: int):
    """Uncentred matrix PCA via the L×L Gram matrix: (atoms [S', *shape], coefficients [L, S']), S' ≤ S.

    S' drops directions with no energy (rank W < S), which keeps the rewrite exact.
    """
    shape = weights[0].shape
    W = torch.stack([w.detach().reshape(-1).double() for w in weights], dim=1)  # (P, L)
    lam, V = torch.linalg.eigh(W.T @ W)  # ascending
    lam, V = lam.flip(0)[:atoms], V.flip(1)[:, :atoms]
    keep = lam > RANK_TOL * lam[0].clamp_min(1e-300)
    lam, V = lam[keep], V[:, keep]
    # D = W V Λ^{-1/2} (orthonormal) and c = Wᵀ D = V Λ^{1/2}; stored rescaled as D Λ^{1/2} = W V and
    # c Λ^{-1/2} = V, the same product D cᵀ = W V Vᵀ, with atoms on the weights' scale (trainable by Adam)
    atoms_ = W @ V  # (P, S')
    dtype = weights[0].dtype
    return atoms_.T.reshape(-1, *shape).to(dtype), V.to(dtype)


def _relative_error(w: torch.Tensor, shared: SharedAtoms, layer: int) -> float:
    with torch.no_grad():
        return float((shared(layer) - w).norm() / w.norm().clamp_min(1e-30))


def as_matrix(name: str, w: torch.Tensor) -> torch.Tensor:
    """The [out, in] matrix a projection applies to its input: wq/wk/wv [H, d, D] → [H·d, D], wo → [Do, Hq·dv]."""
    return w.reshape(w.shape[0], -1) if name == "wo" else w.reshape(-1, w.shape[-1])


class WhitenedResidual:
    """The SVD of the residual in the activations' metric, (W − Ŵ) L = U S Vᵀ with L Lᵀ = Σxxᵀ + εI, and its
    scale ‖W L‖; ``relative[k]`` = s_k / ‖W L‖ (what rank k+1 removes, squared, from the relative error²)."""

    def __init__(self, w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor):
        ridge = (RIDGE * gram.diagonal().mean()).clamp_min(1e-30)
        self.chol = torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype))
        self.u, self.s, self.vh = torch.linalg.svd((w - w_hat) @ self.chol, full_matrices=False)
        self.scale = float((w @ self.chol).norm().clamp_min(1e-300))
        self.relative = self.s / self.scale

    def factors(self, rank: int):
        """(A [out, r], B [r, in], ‖(W − Ŵ)L‖/‖WL‖, ‖(W − Ŵ − AB)L‖/‖WL‖): the best rank-r fit of W − Ŵ."""
        root = self.s[:rank].sqrt()
        a = self.u[:, :rank] * root
        b = root[:, None] * torch.linalg.solve_triangular(self.chol, self.vh[:rank], upper=False, left=False)
        return a, b, float(self.relative.norm()), float(self.relative[rank:].norm())


def whitened_low_rank(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor, rank: int):
    """(A [out, r], B [r, in], ‖(W − Ŵ)L‖/‖WL‖, ‖(W − Ŵ − AB)L‖/‖WL‖): the best rank-r fit of W − Ŵ in ‖(·)L‖_F."""
    return WhitenedResidual(w, w_hat, gram).factors(rank)


def adaptive_ranks(residuals: list, budget: int) -> list:
    """Ranks per layer summing to ``budget`` that minimise Σ_ℓ (relative whitened error_ℓ)²: the ``budget``
    largest relative singular values over all layers (each layer's are sorted, so a top-k pick is a prefix)."""
    pool = sorted(((float(v), j) for j, r in enumerate(residuals) for v in r.relative), reverse=True)[:budget]
    ranks = [0] * len(residuals)
    for _, j in pool:
        ranks[j] += 1
    return ranks


def projection_grams(gm, ctx) -> list:
    """Per site, fp64 InputStats of each projection's input: x, kv and o (per-head outputs [Hq·dv], by the op's own
    pieces), a calibration batch at a time; padding (keys no query sees) left out, self-attention queries too."""
    ops = sites(gm)
    grams = [{} for _ in ops]
    for batch in ctx.track(ctx.calibration, "MASA refinement statistics"):
        for op, records, stats in zip(ops, record_site_inputs(gm, ctx.call(gm), [batch]), grams):
            for rec in records:
                for name, (t, keep, layout) in _projection_inputs(op, rec).items():
                    stats.setdefault(name, InputStats.empty(t.shape[-1])).add(t, keep, layout)
    return grams


def _projection_inputs(op, rec) -> dict:
    """{input: (tokens, keep [B, S] or None, layout)} of one recorded call of ``op``."""
    x, kv, mask, side = rec.args[0], rec.args[1], rec.args[2] if len(rec.args) > 2 else None, rec.args[3:]
    layout, seq_dim = op.info.layout, 0 if op.info.layout == "SBD" else 1
    keep = real_keys(mask, rec.kv_input.shape[1 - seq_dim], rec.kv_input.shape[seq_dim])
    with torch.no_grad():
        q, k, v = op.project_qkv(x, kv, *side)
        o = op.core(q, k, v, mask)
        if op.head_gate is not None:
            g = op.head_gate(op, x, q)  # per head [B, Hq, Sq] or per feature [B, Hq, Sq, dv]
            o = o * (g.unsqueeze(-1) if g.dim() == 3 else g)
    q_keep = keep if kv is None or kv is x else None
    return {"x": (x, q_keep, layout), "kv": (rec.kv_input, keep, layout),
            "o": (o.transpose(1, 2).flatten(-2), q_keep, "BSD")}


@register
@dataclasses.dataclass(frozen=True)
class Masa(Pass):
    name = "masa"
    atoms: Optional[int] = None  # atoms per dictionary; None = the group's size (exact)
    group: str = "all"  # "all" | "auto"
    refine_rank: int = 0  # rank of the whitened low-rank refinement of Q and O (less for K, V); 0 = none
    refine_alloc: str = "adaptive"  # "adaptive": the per-type total moved by error | "uniform": that rank per layer

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    @property
    def exact(self) -> bool:
        return self.atoms is None

    @property
    def needs_calibration(self) -> bool:
        return self.group == "auto" or (isinstance(self.refine_rank, int) and self.refine_rank > 0)

    @property
    def calibration(self):
        if not self.needs_calibration:
            return None
        return Calibration(("whole_model",), "model", "masa shares matrix atoms across layers and refines them on "
                           "whole-model statistics; its streamed two-sweep form is not built yet: convert in memory, "
                           "or use masa without group=auto/refine_rank")

    def check_options(self) -> None:
        if self.atoms is not None and self.atoms < 1:
            raise SpecError(f"masa{{atoms={self.atoms}}}: atoms must be at least 1")
        if not isinstance(self.refine_rank, int) or isinstance(self.refine_rank, bool) or self.refine_rank < 0:
            raise SpecError(f"masa{{refine_rank={self.refine_rank}}}: refine_rank={self.refine_rank} must be >= 0 "
                            "and an int; use refine_rank=0 for no refinement or a rank such as refine_rank=8")
        if self.group not in ("all", "auto"):
            raise SpecError(f"masa{{group={self.group}}}: group must be 'all' or 'auto'")
        if self.refine_alloc not in ("uniform", "adaptive"):
            raise SpecError(f"masa{{refine_alloc={self.refine_alloc}}}: refine_alloc must be 'uniform' or 'adaptive'")

    def run(self, gm, ctx):
        self.check_options()
        if self.refine_rank and not ctx.calibration:
            raise PassError(f"{self.spec()}: {{refine_rank={self.refine_rank}}} needs calibration data to whiten "
                            "the residual; pass calibration=[batches, ...] or use refine_rank=0")
        ops = sites(gm)
        groups = self._groups(gm, ops, ctx)
        for members in groups:
            if self.atoms is not None and self.atoms > len(members):
                raise SpecError(f"masa: atoms={self.atoms} exceeds the {len(members)} layers of group "
                                f"{_label(members)}; use atoms <= {len(members)}")
        shared_of = [dict() for _ in ops]  # site -> {weight name: (SharedAtoms, row)}
        stats, diags, saved = {}, [], 0
        for members in groups:
            if len(members) < 2:
                diags.append(Diagnostic("info", f"group {_label(members)} has one layer; nothing to share",
                                        _label(members)))
                continue
            for name in WEIGHT_NAMES:
                ws = [getattr(ops[i], name) for i in members]
                if len({tuple(w.shape) for w in ws}) > 1:
                    diags.append(Diagnostic("skip", f"{name} shapes differ within group {_label(members)} "
                                            f"({sorted({tuple(w.shape) for w in ws})}); kept per layer",
                                            _label(members)))
                    continue
                atoms, coeff = matrix_pca(ws, self.atoms or len(members))
                shared = SharedAtoms(atoms, coeff)
                saved += sum(w.numel() for w in ws) - atoms.numel() - coeff.numel()
                for row, i in enumerate(members):
                    shared_of[i][name] = (shared, row)
                    stats.setdefault(ops[i].info.name, {})[f"{name}_rel_err"] = _relative_error(ws[row], shared, row)
                    stats[ops[i].info.name][f"{name}_atoms"] = atoms.shape[0]
        refine = self._refine(gm, ops, shared_of, ctx, stats) if self.refine_rank else [{} for _ in ops]
        replace = {}
        for i, op in enumerate(ops):
            if not shared_of[i]:
                continue
            new = rebuild(op)
            own = {n: getattr(op, n) for n in WEIGHT_NAMES if n not in shared_of[i]}
            new.use_weights(AtomWeights({n: s for n, (s, _) in shared_of[i].items()},
                                        {n: r for n, (_, r) in shared_of[i].items()}, own, refine[i]))
            replace[i] = new
        stats["groups"] = [_label(m) for m in groups]
        stats["params_saved"] = saved - stats.get("refine_params", 0)  # net of the refinement factors
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)

    def _refine(self, gm, ops, shared_of, ctx, stats) -> list:
        """Per site {name: (A, B)}; adds refine_params, refined_rel_err (whitened, atoms vs refined) and ranks."""
        grams = projection_grams(gm, ctx)
        refine, errors = [{} for _ in ops], {}
        residuals, ranks = {}, {}
        for i, op in enumerate(ops):
            r = self.refine_rank  # r_Q = r_O = r, r_K = ⌈r·Hk/Hq⌉, r_V = ⌈r·Hv/Hq⌉: less for the shared K/V heads
            ranks[i] = {"wq": r, "wo": r, "wk": math.ceil(r * op.k_heads / op.q_heads),
                        "wv": math.ceil(r * op.v_heads / op.q_heads)}
            if not grams[i]:
                raise PassError(f"{self.spec()}: site {op.info.name} never ran on the calibration data; pass "
                                "batches that reach every attention layer")
            for name, (shared, row) in shared_of[i].items():
                w, w_hat = (as_matrix(name, t.detach()) for t in (getattr(op, name), shared(row)))
                residuals[i, name] = WhitenedResidual(w.double(), w_hat.double(), grams[i][INPUT_OF[name]].gram)
        if self.refine_alloc == "adaptive":  # per type, the uniform total moved to the layers that lose most
            for name in WEIGHT_NAMES:
                keys = [key for key in residuals if key[1] == name]
                for (i, _), k in zip(keys, adaptive_ranks([residuals[key] for key in keys],
                                                          sum(ranks[i][name] for i, _ in keys))):
                    ranks[i][name] = k
        for i, op in enumerate(ops):
            for name in shared_of[i]:
                a, b, before, after = residuals[i, name].factors(ranks[i][name])
                if before <= EXACT:  # the atoms already give W: factors would only fit rounding noise
                    a, b, after = a[:, :0], b[:0], before
                refine[i][name] = (a.to(w.dtype), b.to(w.dtype))
                errors.setdefault(op.info.name, {})[name] = {"atoms": before, "refined": after}
                stats[op.info.name][f"{name}_refine_rank"] = a.shape[1]
        stats["refine_params"] = sum(t.numel() for site in refine for ab in site.values() for t in ab)
        stats["refined_rel_err"] = errors
        return refine

    def _groups(self, gm, ops, ctx) -> list:
        n = len(ops)
        if self.group == "all" or n < 2:
            return [list(range(n))]
        drift = site_drift(gm, ctx)
        return drift_groups(drift, self.atoms or 1)


def _label(members: list) -> str:
    return f"{members[0]}-{members[-1]}" if members else "(empty)"


def site_drift(gm, ctx) -> list:
    """Cosine distance between the token-averaged inputs of consecutive sites, averaged over samples."""
    records = record_site_inputs(gm, ctx.call(gm), ctx.calibration, ctx.track)
    means = []
    for op, per_batch in zip(sites(gm), records):
        token_dim = 0 if op.info.layout == "SBD" else 1
        means.append(torch.cat([r.x.double().mean(token_dim) for r in per_batch]))  # (samples, D)
    return [float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())
            if a.shape == b.shape else 1.0 for a, b in zip(means, means[1:])]


def drift_groups(drift: list, atoms: int) -> list:
    """Cut where the drift exceeds twice its median; merge groups smaller than atoms + 1 across small drifts."""
    n = len(drift) + 1
    if not drift:
        return [list(range(n))]
    cut_at = 2 * statistics.median(drift)
    groups, cur = [], [0]
    for i, d in enumerate(drift):
        if d > cut_at:
            groups.append(cur)
            cur = []
        cur.append(i + 1)
    groups.append(cur)
    while len(groups) > 1 and min(len(g) for g in groups) < atoms + 1:
        j = min(range(len(groups)), key=lambda k: len(groups[k]))
        left = drift[groups[j][0] - 1] if j > 0 else float("inf")
        right = drift[groups[j][-1]] if j < len(groups) - 1 else float("inf")
        k = j - 1 if left <= right else j + 1
        a, b = sorted((j, k))
        groups[a:b + 1] = [groups[a] + groups[b]]
    return groups
