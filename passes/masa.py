"""MASA: Matrix Atom Sharing across layers (Zhussip et al., arXiv 2508.04581; METHODS.md card 6).

    W_ℓ^P ≈ Σ_{s=1..S} c_ℓs^P · D_s^P     for each projection type P ∈ {Q, K, V, O}, one dictionary per group

Training-free "matrix PCA": with W = [vec W_1 … vec W_L] (uncentred), WᵀW = V Λ Vᵀ (an L×L
eigenproblem), atoms D = W V_S Λ_S^{-1/2} (orthonormal under ⟨·,·⟩_F) and c_ℓs = ⟨D_s, W_ℓ⟩,
stored as D_s·√λ_s and c_ℓs/√λ_s (the same W_ℓ, but atoms on the weights' scale for distillation).
Exact when S ≥ rank W, e.g. S = the group's size (``atoms`` unset). Every site of a group reads
one ``SharedAtoms`` module per projection type (counted once); its ``AtomWeights`` provider
rebuilds W_ℓ once per forward (``Attention.use_weights``). Biases stay per layer.

Cases handled:
  1. ``group=all``: one dictionary per projection type over every site.
  2. ``group=auto``: consecutive sites grouped by low drift (cosine distance of the token-averaged
     site inputs of consecutive sites on calibration data); a group smaller than ``atoms + 1`` joins
     its neighbour across the smaller drift.
Refused:
  1. ``atoms < 1`` or an unknown ``group`` (SpecError).
  2. ``atoms`` larger than a group ("atoms=7 exceeds the 6 layers of group 0-5", SpecError).
  3. Weights of one type whose shapes differ within a group: that type of that group stays
     per layer (Diagnostic).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Optional

import torch
from torch import nn

from rewrite.calibrate import record_site_inputs
from rewrite.errors import SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import rebuild
from rewrite.ir import WEIGHT_NAMES
from rewrite.pass_base import Diagnostic, Pass, PassResult, register

__all__ = ["Masa", "SharedAtoms", "AtomWeights", "matrix_pca"]

RANK_TOL = 1e-12  # eigenvalues below this fraction of the largest are null directions


class SharedAtoms(nn.Module):
    """S atoms ``[S, *shape]`` shared by the L layers of a group, with coefficients ``[L, S]``."""

    def __init__(self, atoms: torch.Tensor, coefficients: torch.Tensor):
        super().__init__()
        self.atoms = nn.Parameter(atoms)
        self.coefficients = nn.Parameter(coefficients)

    def forward(self, layer: int) -> torch.Tensor:
        return torch.tensordot(self.coefficients[layer], self.atoms, dims=1)  # Σ_s c_ℓs D_s


class AtomWeights(nn.Module):
    """One site's ``(wq, wk, wv, wo)``: rebuilt from a group's atoms, or the site's own Parameter."""

    def __init__(self, shared: dict, layers: dict, own: dict):
        super().__init__()
        self.shared = nn.ModuleDict(shared)  # name -> SharedAtoms (the same module in every site of the group)
        self.layers = dict(layers)  # name -> this site's row in the coefficients
        self.own = nn.ParameterDict({n: nn.Parameter(w.detach().clone()) for n, w in own.items()})

    def forward(self):
        return tuple(self.shared[n](self.layers[n]) if n in self.shared else self.own[n] for n in WEIGHT_NAMES)


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


@register
@dataclasses.dataclass(frozen=True)
class Masa(Pass):
    name = "masa"
    atoms: Optional[int] = None  # atoms per dictionary; None = the group's size (exact)
    group: str = "all"  # "all" | "auto"

    @property
    def exact(self) -> bool:
        return self.atoms is None

    @property
    def needs_calibration(self) -> bool:
        return self.group == "auto"

    def check_options(self) -> None:
        if self.atoms is not None and self.atoms < 1:
            raise SpecError(f"masa{{atoms={self.atoms}}}: atoms must be at least 1")
        if self.group not in ("all", "auto"):
            raise SpecError(f"masa{{group={self.group}}}: group must be 'all' or 'auto'")

    def run(self, gm, ctx):
        self.check_options()
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
        replace = {}
        for i, op in enumerate(ops):
            if not shared_of[i]:
                continue
            new = rebuild(op)
            own = {n: getattr(op, n) for n in WEIGHT_NAMES if n not in shared_of[i]}
            new.use_weights(AtomWeights({n: s for n, (s, _) in shared_of[i].items()},
                                        {n: r for n, (_, r) in shared_of[i].items()}, own))
            replace[i] = new
        stats["groups"] = [_label(m) for m in groups]
        stats["params_saved"] = saved
        return PassResult(with_sites(gm, replace), bool(replace), stats, diags)

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
