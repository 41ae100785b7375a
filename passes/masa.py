"""MASA: Matrix Atom Sharing across layers (Zhussip et al., arXiv 2508.04581; METHODS.md card 6).

    W_ℓ^P ≈ Σ_{s=1..S} c_ℓs^P · D_s^P     for each projection type P ∈ {Q, K, V, O}, one dictionary per group

Training-free "matrix PCA": with W = [vec W_1 … vec W_L] (uncentred), WᵀW = V Λ Vᵀ (an L×L
eigenproblem), atoms D = W V_S Λ_S^{-1/2} (orthonormal under ⟨·,·⟩_F) and c_ℓs = ⟨D_s, W_ℓ⟩,
stored as D_s·√λ_s and c_ℓs/√λ_s (the same W_ℓ, but atoms on the weights' scale for distillation).
Exact when S ≥ rank W, e.g. S = the group's size (``atoms`` unset). That is ``fit=weights``.

Whitened fit (``fit=whitened``; ``fit=auto``, the default, is whitened when calibration data is given, else
weights): atoms and coefficients of each type and group that minimise the error on the activations,

    min_{C, D}  Σ_ℓ ‖(W_ℓ − Σ_s c_ℓs D_s) L_ℓ‖_F² / ‖W_ℓ L_ℓ‖_F²,   L_ℓ L_ℓᵀ = G_ℓ = Σxxᵀ + εI

(W_ℓ as the [out, in] matrix it applies, Σxxᵀ over its calibration input as in the refinement below; each layer's
relative error, which measured better than the absolute Σ_ℓ ‖(·)L_ℓ‖²: +0.76 against +1.28 bpb at atoms=2), from
the better of the weight PCA's and the whitened PCA's coefficients (PCA of the W_ℓ L_ℓ), each with its best atoms,
by alternating least squares, every step an exact minimisation, so the objective never rises:
    coefficients, per layer:  A c_ℓ = b,  A_st = tr(D_s G_ℓ D_tᵀ),  b_s = tr(D_s G_ℓ W_ℓᵀ)
    atoms:  D H = R,  D = [D_1 … D_S] [out, S·in],  H_(t,s) = Σ_ℓ w_ℓ c_ℓt c_ℓs G_ℓ,  R_s = Σ_ℓ w_ℓ c_ℓs W_ℓ G_ℓ
(w_ℓ = 1/‖W_ℓ L_ℓ‖²; above S·in = 4096 block Gauss-Seidel over the atoms instead of the one system). ALS crawls
(demo-lm, atoms=2: +0.89 bpb after 30 rounds, +0.76 after 100), so where the atom step is the one exact solve,
L-BFGS on the L·S coefficients alone (variable projection: φ(C) = min_D f, ∇φ = 2 w_ℓ (A c_ℓ − b) at D*(C)) runs
first, about 30 atom steps (MiniLM, 6 layers, 3 atoms: 9 s against 30 s for 100 ALS rounds, and a lower objective);
ALS then polishes. The ridge ε of G_ℓ is cross-validated per type and group (``cross_validate``: fitted on the even
calibration sequences, scored on the odd ones and the other way round, over FIT_RIDGES and the weight PCA itself,
which is kept where it scores best): few calibration tokens against the width overfit a small ridge. Stored as
above: C = QR, coefficients Q (orthonormal columns), atoms R·D on the weights' scale. On the reference decoder
(demo-lm, 4 layers almost orthogonal per type; bits per byte above the original's 2.511 on 200 held-out texts, 64
calibration texts), weights → whitened: atoms=1 +2.07 → +1.69, atoms=2 +1.99 → +0.76 (+0.754 with the
cross-validated ridge, 1e-3 chosen), atoms=3 +1.90 → +0.27. stats["fit"][group][type]:
the objective of the weight PCA and of the fit, the ALS rounds run, the held-out scores and the ridge chosen.

Every site of a group reads one ``SharedAtoms`` module per projection type (counted once); its ``AtomWeights``
provider rebuilds W_ℓ once per forward (``Attention.use_weights``). Biases stay per layer.

Local refinement (``refine_rank=r`` > 0; needs calibration), per layer ℓ and shared type, SVD-LLM style
(``refine_alloc=adaptive``, the default: the per-type total of the ranks below, moved to the layers whose
relative whitened error it lowers most, i.e. the largest s_k/‖W_ℓ L_ℓ‖ over all layers; on the reference
decoder, fit=weights, +0.90 → +0.18 bpb for atoms=2, refine_rank=8; ``refine_alloc=uniform``: the ranks below
in every layer):

    W'_ℓ = Ŵ_ℓ + A_ℓ B_ℓ,  (W_ℓ − Ŵ_ℓ) L_ℓ = U S Vᵀ,  A_ℓ = U_r S_r^½,  B_ℓ = S_r^½ V_rᵀ L_ℓ⁻¹,  L_ℓ L_ℓᵀ = Σxxᵀ + εI
    r_Q = r_O = r,  r_K = ⌈r·Hk/Hq⌉,  r_V = ⌈r·Hv/Hq⌉  (each at most min(out, in))

on the [out, in] matrix a projection applies (wq [H,dh,D] as [H·dh, D], wo [Do,Hq,dv] as [Do, Hq·dv]); Σxxᵀ
(fp64, padding left out) is over its calibration input: x for Q, the key/value input for K and V, the (gated)
per-head attention outputs for O. A B is the best rank-r fit of the residual in ‖(·)L‖_F, the error on those
activations; full rank restores W_ℓ. A_ℓ, B_ℓ are the site's own Parameters in its ``AtomWeights``.
With the whitened fit, atoms and refinement then alternate (at most 25 rounds, until one lowers the objective by
< 0.1 %): one ALS round of the atoms on W_ℓ − A_ℓ B_ℓ, then A_ℓ B_ℓ refitted (the ranks above) to the new residual,
both exact minimisations of J = Σ_types Σ_ℓ ‖(W_ℓ − Ŵ_ℓ − A_ℓ B_ℓ) L_ℓ‖² / ‖W_ℓ L_ℓ‖² (stats "joint_objective").
atoms=2, refine_rank=8 on the reference decoder: fit=weights +0.173 bpb, the whitened fit refined once +0.193,
alternated +0.080 (+0.066 with the cross-validated ridge).

Cases handled:
  1. ``group=all``: one dictionary per projection type over every site.
  2. ``group=auto``: consecutive sites grouped by low drift (cosine distance of the token-averaged
     site inputs of consecutive sites on calibration data); a group smaller than ``atoms + 1`` joins
     its neighbour across the smaller drift.
Refused:
  1. ``atoms < 1``, ``refine_rank`` not an int ≥ 0 or an unknown ``group`` (SpecError).
  2. ``atoms`` larger than a group ("atoms=7 exceeds the 6 layers of group 0-5", SpecError).
  3. Weights of one type whose shapes differ within a group: that type of that group stays per layer (Diagnostic).
  4. ``refine_rank`` > 0, ``group=auto`` or ``fit=whitened`` without calibration data (PassError); an unknown
     ``fit`` (SpecError).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Optional

import torch
from torch import nn

from rewrite.calibrate import InputStats, odd_sequences, real_keys, record_site_inputs
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
FITS = ("auto", "weights", "whitened")
RELATIVE = True  # whitened fit: each layer's error relative to ‖W_ℓ L_ℓ‖ (+0.76 bpb on demo-lm; absolute +1.28)
ALS_ITERS = 100  # alternating least squares: at most this many rounds ...
ALS_TOL = 1e-6  # ... stopping when a round lowers the objective by less than this fraction
VP_ITERS = 50  # variable-projection L-BFGS iterations before the ALS rounds (exact atom steps only)
JOINT_ROUNDS = 25  # with refine_rank: at most this many rounds of atoms ↔ refinement ...
JOINT_ALS = 1  # ... each with this many ALS rounds on W_ℓ − A_ℓ B_ℓ ...
JOINT_TOL = 1e-3  # ... stopping when a round lowers the joint objective by less than this fraction
JOINT_LIMIT = 4096  # S·in up to which the atom step solves one [S·in, S·in] system (else block Gauss-Seidel)
GS_SWEEPS = 10  # Gauss-Seidel sweeps over the atoms per atom step beyond JOINT_LIMIT (warm-started)
FIT_RIDGES = (1e-6, 1e-3, 1e-1, 1.0)  # whitened fit: the ridges cross-validated (fractions of the mean diagonal)
CV_VP, CV_ALS = 15, 5  # ... with this many L-BFGS iterations and ALS rounds per candidate


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


def _ridged(gram: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Σxxᵀ + εI, ε = ``ridge`` · its mean diagonal (RIDGE as in ``WhitenedResidual``): positive definite."""
    ridge = (ridge * gram.diagonal().mean()).clamp_min(1e-30)
    return gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


class WhitenedFit:
    """Atoms and coefficients of one projection type and group that minimise the error on the activations,

        f(C, D) = Σ_ℓ w_ℓ ‖(M_ℓ − Σ_s c_ℓs D_s) L_ℓ‖_F²,   L_ℓ L_ℓᵀ = G_ℓ = Σxxᵀ + εI,

    from the better of the weight PCA's and the whitened PCA's coefficients (each with its best atoms), by variable
    projection (``_project``, where the atom step is one exact solve) and then alternating least squares (each
    step an exact block minimisation): f never rises. ``mats``: the [out, in] matrices
    M_ℓ (fp64), ``grams``: their inputs' Σxxᵀ (fp64); ``relative``: w_ℓ = 1 / ‖M_ℓ L_ℓ‖² (each layer's relative
    error) instead of 1. ``fit`` leaves ``coefficients`` [L, S] with orthonormal columns, ``atoms`` [S, out, in]
    carrying the scale (the matrix PCA's convention) and ``history``, f after the start and after each round."""

    def __init__(self, mats: list, grams: list, relative: Optional[bool] = None, ridge: float = RIDGE):
        relative = RELATIVE if relative is None else relative
        self.grams = [_ridged(g.to(m), ridge) for m, g in zip(mats, grams)]
        self.scales = [float(torch.sum((m @ g) * m)) for m, g in zip(mats, self.grams)]  # ‖M_ℓ L_ℓ‖²
        self.w = [1.0 / max(s, 1e-300) if relative else 1.0 for s in self.scales]
        self.targets(mats)

    def targets(self, mats: list) -> "WhitenedFit":
        """Fit these [out, in] matrices (W_ℓ − A_ℓ B_ℓ in the joint rounds) with the same grams and w_ℓ."""
        self.mats = mats
        self.mg = [m @ g for m, g in zip(mats, self.grams)]  # M_ℓ G_ℓ
        self.mgm = [float(torch.sum(mg * m)) for m, mg in zip(mats, self.mg)]  # tr(M_ℓ G_ℓ M_ℓᵀ)
        return self

    def fit(self, atoms: int, max_iters: Optional[int] = None, tol: float = ALS_TOL, start=None,
            vp_iters: int = VP_ITERS) -> "WhitenedFit":
        """Variable projection then ALS from the better PCA start, or ALS alone from ``start`` = (coefficients,
        atoms); ``history``: f at the start, after the projection, after each ALS round."""
        max_iters = ALS_ITERS if max_iters is None else max_iters
        best = None
        for c, d in [start] if start is not None else [(c, None) for c in (self._weight_pca(atoms),
                                                                            self._whitened_pca(atoms))]:
            if d is None:
                c, d = self._orthonormal(c, self.atom_step(c))
            moments = self.moments(d)
            f = self.objective(c, d, moments)
            if best is None or f < best[2]:
                best = (c, d, f, moments)
        self.coefficients, self.atoms, f, moments = best
        self.history = [f]
        if start is None and max_iters and atoms * self.mats[0].shape[1] <= JOINT_LIMIT:  # exact atom steps
            moments = self._project(vp_iters, tol)
            f = self.history[-1]
        for _ in range(max_iters):
            c = self.coefficient_step(moments)
            c, d = self._orthonormal(c, self.atom_step(c, self.atoms))
            new_moments = self.moments(d)
            f_new = self.objective(c, d, new_moments)
            if f_new > f:  # rounding at convergence: keep the better pair
                break
            self.coefficients, self.atoms, moments = c, d, new_moments
            self.history.append(f_new)
            if f - f_new <= tol * max(f, 1e-300):
                break
            f = f_new
        return self

    def _project(self, max_iters: int, tol: float) -> list:
        """Variable projection: L-BFGS on φ(C) = min_D f(C, D) (the atom step gives the minimiser), whose gradient
        is ∂f/∂c_ℓ = 2 w_ℓ (A_ℓ c_ℓ − b_ℓ) at D*(C) (the envelope theorem), at most ``max_iters`` iterations; the
        best C it evaluates is kept (never worse than the start). In ~30 atom steps it reaches what ALS reaches
        in hundreds, or lower. Returns the moments of the kept atoms."""
        f0 = self.history[-1]
        if f0 <= EXACT ** 2 * sum(w * mgm for w, mgm in zip(self.w, self.mgm)):  # already exact: nothing to descend
            return self.moments(self.atoms)
        x = self.coefficients.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1, max_iter=max_iters, max_eval=max_iters * 5 // 4, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=0, tolerance_change=tol * f0 * 1e-3)
        best = [f0, self.coefficients]

        def closure():
            with torch.no_grad():
                c = x.detach()
                moments = self.moments(self.atom_step(c))
                x.grad = torch.stack([2 * w * (a @ c[l] - b) for l, (w, (a, b)) in enumerate(zip(self.w, moments))])
                f = self.objective(c, None, moments)
                if f < best[0]:
                    best[:] = f, c.clone()
                return torch.tensor(f, dtype=x.dtype)

        opt.step(closure)
        c, d = self._orthonormal(best[1], self.atom_step(best[1]))
        moments = self.moments(d)
        f = self.objective(c, d, moments)
        if f <= f0:  # the same C as the best evaluated, up to rounding
            self.coefficients, self.atoms = c, d
            self.history.append(f)
            return moments
        return self.moments(self.atoms)

    def moments(self, d: torch.Tensor) -> list:
        """Per layer (A_ℓ [S, S], b_ℓ [S]), A_st = tr(D_s G_ℓ D_tᵀ), b_s = tr(D_s G_ℓ M_ℓᵀ): the coefficients'
        normal equations, and with tr(M_ℓ G_ℓ M_ℓᵀ) the objective for any coefficients."""
        flat = d.reshape(d.shape[0], -1)
        return [((d @ g).reshape(d.shape[0], -1) @ flat.T, flat @ mg.reshape(-1)) for g, mg in zip(self.grams, self.mg)]

    def objective(self, c: torch.Tensor, d: torch.Tensor, moments: Optional[list] = None) -> float:
        """f(C, D) = Σ_ℓ w_ℓ tr(E_ℓ G_ℓ E_ℓᵀ), E_ℓ = M_ℓ − Σ_s c_ℓs D_s, = Σ_ℓ w_ℓ (tr(M G Mᵀ) − 2 cᵀb + cᵀA c)."""
        moments = self.moments(d) if moments is None else moments
        return sum(w * max(mgm - 2 * float(c[l] @ b) + float(c[l] @ a @ c[l]), 0.0)
                   for l, (w, mgm, (a, b)) in enumerate(zip(self.w, self.mgm, moments)))

    def coefficient_step(self, moments: list) -> torch.Tensor:
        """Per layer, A c_ℓ = b (the ``moments`` of the current atoms)."""
        return torch.stack([torch.linalg.lstsq(a, b[:, None]).solution[:, 0]  # lstsq: an atom may vanish
                            for a, b in moments])

    def atom_step(self, c: torch.Tensor, d: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D H = R: H block (t, s) = Σ_ℓ w_ℓ c_ℓt c_ℓs G_ℓ, R block s = Σ_ℓ w_ℓ c_ℓs M_ℓ G_ℓ, D = [D_1 … D_S].

        Above JOINT_LIMIT, GS_SWEEPS block Gauss-Seidel sweeps (each atom's own in×in system) from ``d`` (the
        previous atoms; else the plain least squares C⁺M): each update an exact minimisation, f never rises."""
        n_atoms, (out, d_in) = c.shape[1], self.mats[0].shape
        r = torch.stack([sum(w * c[l, s] * mg for l, (mg, w) in enumerate(zip(self.mg, self.w)))
                         for s in range(n_atoms)])  # [S, out, in]

        def h(t, s):
            return sum(w * c[l, t] * c[l, s] * g for l, (g, w) in enumerate(zip(self.grams, self.w)))

        if n_atoms * d_in <= JOINT_LIMIT:  # one [S·in, S·in] system
            big = torch.cat([torch.cat([h(t, s) for s in range(n_atoms)], 1) for t in range(n_atoms)], 0)
            rhs = r.permute(1, 0, 2).reshape(out, n_atoms * d_in)  # [out, S·in]
            sol = _spd_solver(big)(rhs.T).T  # H symmetric: D = R H⁻¹
            return sol.reshape(out, n_atoms, d_in).permute(1, 0, 2).contiguous()
        if d is None:
            flat = torch.stack([m.reshape(-1) for m in self.mats])  # [L, out·in]
            d = torch.linalg.lstsq(c, flat).solution.reshape(n_atoms, out, d_in)
        d = d.clone()
        blocks = {(t, s): h(t, s) for t in range(n_atoms) for s in range(t, n_atoms)}
        blocks.update({(s, t): v for (t, s), v in list(blocks.items())})
        solve = [_spd_solver(blocks[s, s]) for s in range(n_atoms)]
        for _ in range(GS_SWEEPS):
            for s in range(n_atoms):
                d[s] = solve[s]((r[s] - sum(d[t] @ blocks[t, s] for t in range(n_atoms) if t != s)).T).T
        return d

    def _orthonormal(self, c: torch.Tensor, d: torch.Tensor):
        """C = Q R, D ← R D: the same Σ_s c_ℓs D_s, with orthonormal coefficient columns (the scale in the atoms)."""
        q, r = torch.linalg.qr(c)
        return q, torch.tensordot(r, d, dims=1)

    def _weight_pca(self, atoms: int) -> torch.Tensor:
        flat = torch.stack([m.reshape(-1) for m in self.mats], 1)
        return _top_eigenvectors(flat.T @ flat, atoms)

    def _whitened_pca(self, atoms: int) -> torch.Tensor:
        flat = torch.stack([(m @ torch.linalg.cholesky(g)).reshape(-1) * w ** 0.5
                            for m, g, w in zip(self.mats, self.grams, self.w)], 1)
        return _top_eigenvectors(flat.T @ flat, atoms)


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    lam, v = torch.linalg.eigh(gram)
    return v.flip(1)[:, :k]


def _spd_solver(a: torch.Tensor):
    """b ↦ a⁻¹ b for a symmetric positive (semi)definite ``a``: Cholesky, least squares where it is singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return lambda b: torch.cholesky_solve(b, chol)
    return lambda b: torch.linalg.lstsq(a, b).solution


def cross_validate(mats: list, folds: list, atoms: int, pca: tuple) -> dict:
    """Held-out relative whitened error of the whitened fit at each ridge of FIT_RIDGES, and of the weight PCA
    ``pca`` = (coefficients, atoms) as "weights": fitted on the even calibration sequences and scored on the odd
    ones (Σ_ℓ ‖E_ℓ L_ℓ‖² / ‖W_ℓ L_ℓ‖² with the other fold's Σxxᵀ), then the other way round, summed. Few
    calibration tokens against the width overfit the fit at a small ridge (random-weight models, 72 tokens of
    width 64: 2× the PCA's output error at 1e-6, level at 0.1), many do not (demo-lm, 2,400 tokens of width 256:
    1e-6 best). One calibration sequence (no odd fold): {} (``Masa._fit`` then takes FIT_RIDGES' largest)."""
    if any(float(odd.diagonal().sum()) == 0 for _, odd in folds):
        return {}
    scores = {ridge: 0.0 for ridge in FIT_RIDGES}
    scores["weights"] = 0.0
    for train, test in ((0, 1), (1, 0)):
        judge = WhitenedFit(mats, [f[test] for f in folds])
        scores["weights"] += judge.objective(*pca)
        for ridge in FIT_RIDGES:
            fit = WhitenedFit(mats, [f[train] for f in folds], ridge=ridge).fit(atoms, max_iters=CV_ALS,
                                                                               vp_iters=CV_VP)
            scores[ridge] += judge.objective(fit.coefficients, fit.atoms)
    return scores


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


def projection_grams(gm, ctx, folds: bool = False):
    """Per site, fp64 InputStats of each projection's input: x, kv and o (per-head outputs [Hq·dv], by the op's own
    pieces), a calibration batch at a time; padding (keys no query sees) left out, self-attention queries too.
    Summed from the stats of the even and of the odd calibration sequences (counted over every batch), which
    ``folds`` returns second, for choosing the whitened fit's ridge on data it was not fitted to."""
    ops = sites(gm)
    halves, rows = [{} for _ in ops], [0] * len(ops)
    for batch in ctx.track(ctx.calibration, "MASA refinement statistics"):
        for i, (op, records) in enumerate(zip(ops, record_site_inputs(gm, ctx.call(gm), [batch]))):
            for rec in records:
                for name, (t, keep, layout) in _projection_inputs(op, rec).items():
                    pair = halves[i].setdefault(name, (InputStats.empty(t.shape[-1]), InputStats.empty(t.shape[-1])))
                    for stats, fold_keep in zip(pair, _fold_keeps(t, keep, layout, rows[i])):
                        stats.add(t, fold_keep, layout)
                rows[i] += rec.args[0].shape[1 if op.info.layout == "SBD" else 0]
    grams = [{name: even + odd for name, (even, odd) in site.items()} for site in halves]
    return (grams, halves) if folds else grams


def _fold_keeps(t: torch.Tensor, keep, layout: str, first_row: int) -> tuple:
    """``keep`` [B, S] (all True when None) split into the even and the odd sequences, numbered from ``first_row``."""
    b, s = (t.shape[1], t.shape[0]) if layout == "SBD" else (t.shape[0], t.shape[1])
    base = torch.ones(b, s, dtype=torch.bool, device=t.device) if keep is None else keep.to(t.device)
    odd = odd_sequences(b, first_row)[0].to(t.device)[:, None]
    return base & ~odd, base & odd


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
    fit: str = "auto"  # "weights": matrix PCA | "whitened": least squares on the activations | "auto": whitened
    #                    when calibration data is given, else weights

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    @property
    def exact(self) -> bool:
        return self.atoms is None

    @property
    def needs_calibration(self) -> bool:
        return (self.group == "auto" or self.fit == "whitened"
                or (isinstance(self.refine_rank, int) and self.refine_rank > 0))

    @property
    def calibration(self):
        if not self.needs_calibration:
            return None
        return Calibration(("whole_model",), "model", "masa shares matrix atoms across layers and refines them on "
                           "whole-model statistics; its streamed two-sweep form is not built yet: convert in memory, "
                           "or use masa without group=auto/refine_rank/fit=whitened")

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
        if self.fit not in FITS:
            raise SpecError(f"masa{{fit={self.fit}}}: fit must be 'auto', 'weights' or 'whitened' (whitened: atoms "
                            "fitted to the calibration activations; auto: whitened when calibration data is given)")

    def whitened(self, ctx) -> bool:
        """Whether the atoms are fitted on the activations (``fit=whitened``, or ``auto`` with calibration)."""
        return self.fit == "whitened" or (self.fit == "auto" and bool(ctx.calibration))

    def run(self, gm, ctx):
        self.check_options()
        if self.refine_rank and not ctx.calibration:
            raise PassError(f"{self.spec()}: {{refine_rank={self.refine_rank}}} needs calibration data to whiten "
                            "the residual; pass calibration=[batches, ...] or use refine_rank=0")
        if self.fit == "whitened" and not ctx.calibration:
            raise PassError(f"{self.spec()}: {{fit=whitened}} needs calibration data (each projection's input "
                            "Σxxᵀ) to fit the atoms on the activations; pass calibration=[batches, ...] or use "
                            "fit=weights (matrix PCA of the weights alone)")
        ops = sites(gm)
        groups = self._groups(gm, ops, ctx)
        for members in groups:
            if self.atoms is not None and self.atoms > len(members):
                raise SpecError(f"masa: atoms={self.atoms} exceeds the {len(members)} layers of group "
                                f"{_label(members)}; use atoms <= {len(members)}")
        shared_of = [dict() for _ in ops]  # site -> {weight name: (SharedAtoms, row)}
        stats, diags, saved = {}, [], 0
        whitened = self.whitened(ctx)
        grams, folds = self._grams(gm, ops, ctx) if whitened or self.refine_rank else (None, None)
        fits = []
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
                fit = None
                if whitened:
                    fit, (atoms, coeff) = self._fit(
                        name, ws, [grams[i][INPUT_OF[name]].gram for i in members],
                        [tuple(f.gram for f in folds[i][INPUT_OF[name]]) for i in members], (atoms, coeff),
                        _label(members), stats)
                shared = SharedAtoms(atoms, coeff)
                if fit is not None:
                    fits.append((name, members, fit, shared))
                saved += sum(w.numel() for w in ws) - atoms.numel() - coeff.numel()
                for row, i in enumerate(members):
                    shared_of[i][name] = (shared, row)
                    stats.setdefault(ops[i].info.name, {})[f"{name}_rel_err"] = _relative_error(ws[row], shared, row)
                    stats[ops[i].info.name][f"{name}_atoms"] = atoms.shape[0]
        refine = self._refine(grams, ops, shared_of, stats) if self.refine_rank else [{} for _ in ops]
        if self.refine_rank and fits:
            refine = self._joint(ops, grams, shared_of, fits, refine, stats)
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

    def _grams(self, gm, ops, ctx) -> tuple:
        """``projection_grams`` with its even/odd folds, refused when a site never ran on the calibration data."""
        grams, folds = projection_grams(gm, ctx, folds=True)
        for op, g in zip(ops, grams):
            if not g:
                raise PassError(f"{self.spec()}: site {op.info.name} never ran on the calibration data; pass "
                                "batches that reach every attention layer")
        return grams, folds

    def _fit(self, name, ws, grams, folds, pca, label, stats):
        """(fit, (atoms, coefficients)) in the weights' shapes and dtype, as many atoms as the matrix PCA ``pca``:
        the ``WhitenedFit`` at the ridge that ``cross_validate`` chose, or ``pca`` itself (fit None) where the
        weight PCA had the lower held-out error. stats["fit"][group][name]: the whitened objective of the PCA and
        of the fit, the ALS rounds, the held-out error of every candidate and the one chosen."""
        shape, dtype, n_atoms = ws[0].shape, ws[0].dtype, pca[0].shape[0]
        mats = [as_matrix(name, w.detach()).double() for w in ws]
        pca_d = (pca[1].double(), torch.stack([as_matrix(name, a).double() for a in pca[0]]))
        held_out = cross_validate(mats, folds, n_atoms, pca_d)
        ridge = min(held_out, key=held_out.get) if held_out else FIT_RIDGES[-1]
        record = stats.setdefault("fit", {}).setdefault(label, {})[name] = {"held_out": held_out, "ridge": ridge}
        if ridge == "weights":
            return None, pca
        fit = WhitenedFit(mats, grams, ridge=ridge).fit(n_atoms)
        record.update(weights=fit.objective(*pca_d), whitened=fit.history[-1], iterations=len(fit.history) - 1)
        return fit, (fit.atoms.reshape(n_atoms, *shape).to(dtype), fit.coefficients.to(dtype))

    def _joint(self, ops, grams, shared_of, fits, refine, stats) -> list:
        """Atoms ↔ refinement: ALS of the atoms on W_ℓ − A_ℓ B_ℓ, then A_ℓ B_ℓ refitted to the new residual, each
        an exact minimisation of J = Σ_types Σ_ℓ (‖(W_ℓ − Ŵ_ℓ − A_ℓ B_ℓ) L_ℓ‖ / ‖W_ℓ L_ℓ‖)² (the ``refined``
        errors squared), until a round lowers J by less than JOINT_TOL of it; J per round in stats."""
        history = [_joint_objective(stats)]
        for _ in range(JOINT_ROUNDS):
            saved = [(shared.atoms.detach().clone(), shared.coefficients.detach().clone()) for *_, shared in fits]
            for name, members, fit, shared in fits:
                fit.targets([as_matrix(name, getattr(ops[i], name).detach()).double()
                             - (refine[i][name][0] @ refine[i][name][1]).double() for i in members])
                fit.fit(fit.atoms.shape[0], max_iters=JOINT_ALS, start=(fit.coefficients, fit.atoms))
                with torch.no_grad():
                    shared.atoms.copy_(fit.atoms.reshape(shared.atoms.shape))
                    shared.coefficients.copy_(fit.coefficients)
            refine = self._refine(grams, ops, shared_of, stats)
            history.append(_joint_objective(stats))
            if history[-1] > history[-2]:  # rounding at convergence (fp32 factors): keep the better round
                with torch.no_grad():
                    for (atoms, coeff), (*_, shared) in zip(saved, fits):
                        shared.atoms.copy_(atoms)
                        shared.coefficients.copy_(coeff)
                refine = self._refine(grams, ops, shared_of, stats)
                history.pop()
                break
            if history[-2] - history[-1] <= JOINT_TOL * history[-2]:
                break
        stats["joint_objective"] = history
        return refine

    def _refine(self, grams, ops, shared_of, stats) -> list:
        """Per site {name: (A, B)}; adds refine_params, refined_rel_err (whitened, atoms vs refined) and ranks."""
        refine, errors = [{} for _ in ops], {}
        residuals, ranks = {}, {}
        for i, op in enumerate(ops):
            r = self.refine_rank  # r_Q = r_O = r, r_K = ⌈r·Hk/Hq⌉, r_V = ⌈r·Hv/Hq⌉: less for the shared K/V heads
            ranks[i] = {"wq": r, "wo": r, "wk": math.ceil(r * op.k_heads / op.q_heads),
                        "wv": math.ceil(r * op.v_heads / op.q_heads)}
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


def _joint_objective(stats) -> float:
    """Σ over sites and shared types of the refined relative whitened error squared."""
    return sum(e["refined"] ** 2 for site in stats["refined_rel_err"].values() for e in site.values())


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
