"""RoRoPE (TransMLA): one shared RoPE key for all KV heads, by rotating each RoPE frequency plane across heads.

RoPE turns the 2-D plane of frequency pair f of every KV head g by the same angle, so a G×G mix A_f applied
alike to both components of the pair commutes with it: z_j^f = Σ_g A_f[j, g] k_g^f, R(z_j^f) = Σ_g A_f[j, g]
R(k_g^f), and k_g^f = Σ_j B_f[g, j] z_j^f with B_f = A_f⁻¹. Row j = 0 is the shared RoPE key; for query head i
of group g

    q_i^f · R(k_g^f) = R(B_f[g, 0] q_i^f) · R(z_0^f)  +  q_i^f · Σ_{j≥1} B_f[g, j] R(z_j^f)

and the second term (the rest) loses its RoPE: kept as q_i^f · Σ_{j≥1} B_f[g, j] z_j^f for the pairs the caller
marks ``residual``, dropped for the others: the only approximation, zero for G = 1 (MQA) and when the keys of the
plane have rank one across heads. A_f = Uᵀ D^{1/2}: U the eigenvectors of D^{1/2} C_f D^{1/2} (C_f = E[k^f k^fᵀ]
over the pair's two components, G×G, from the calibration grams), eigenvalues descending, so z_0 holds the most
(weighted) key energy; D = diag(w_g), w_g the energy of group g's queries on the pair (or I).
"""
from __future__ import annotations

from typing import Optional

import torch

from .calibrate import head_grams

__all__ = ["plane_mixes", "split_keys"]


def plane_mixes(wk, bk, kept: torch.Tensor, stats, q_energy: Optional[torch.Tensor] = None):
    """(A ``[F, G, G]`` per kept pair, the share of the kept planes' (weighted) key energy in z_0).

    ``kept [F, 2]`` the dims of each kept pair; ``q_energy [G, dh]`` (optional) weighs head g by its queries'
    E[q²] on the pair. Without statistics (G = 1 only) A = I."""
    g, f = wk.shape[0], kept.shape[0]
    if g == 1 or stats is None or f == 0:
        return torch.eye(g, dtype=torch.float64).expand(f, g, g).clone(), 1.0
    dims = kept.reshape(-1)
    m = head_grams(wk[:, dims], None if bk is None else bk[:, dims], stats.gram, stats.total, stats.count)
    m = m.reshape(g, g, f, 2, f, 2).cpu()
    mixes, top, total = [], 0.0, 0.0
    for p in range(f):
        c = m[:, :, p, 0, p, 0] + m[:, :, p, 1, p, 1]  # [G, G] E[k_g·k_g'] on the plane
        w = torch.ones(g, dtype=torch.float64)
        if q_energy is not None:
            w = q_energy[:, kept[p]].sum(-1).double().clamp_min(1e-30)
            w = w / w.mean()
        ev, u = torch.linalg.eigh(w.sqrt()[:, None] * c * w.sqrt()[None, :])
        u = u.flip(-1)  # columns by eigenvalue, descending
        mixes.append(u.T * w.sqrt()[None, :])
        top, total = top + float(ev[-1]), total + float(ev.clamp_min(0).sum())
    return torch.stack(mixes), top / max(total, 1e-30)


def split_keys(wk, bk, wq, bq, k_map, keep: torch.Tensor, pair_of: torch.Tensor, mixes: torch.Tensor,
               residual: torch.Tensor):
    """Every piece of the RoRoPE site, source head dims ``keep [dr]`` in the shared key.

    ``residual [dr]`` (bool): the kept dims whose rest (z_j, j ≥ 1) stays in the latent without RoPE; the
    others' rest is dropped. Returns a dict: ``w_kr [1, dr, D]``/``b_kr`` (the shared key z_0), ``feats [Nk, D]``/
    ``b_feats`` (what the latent must hold of the keys: the other dims of every head, then z_j for j ≥ 1 on the
    residual dims), ``place [G, dn, Nk]`` (head g's non-RoPE key from them), ``w_q [H, dn + dr, D]``/``b_q``
    (queries: [q_i on the non-RoPE dims; B[g, 0]·q_i on ``keep``])."""
    g, dh, d = wk.shape
    other = torch.tensor([j for j in range(dh) if j not in set(keep.tolist())], dtype=torch.long)
    a = mixes[pair_of].to(wk.dtype)  # [dr, G, G] the mix of each kept dim's pair
    b = torch.linalg.inv(mixes.double())[pair_of].to(wk.dtype)  # [dr, G, G] B = A⁻¹
    rot = torch.einsum("cjg,gcd->jcd", a, wk[:, keep])  # [G, dr, D] z_j on the kept dims
    res = residual.nonzero()[:, 0] if g > 1 else residual.new_zeros(0, dtype=torch.long)  # G = 1: no rest
    nope_dims, n_o, n_r = torch.cat([other, keep[res]]), other.numel(), res.numel()
    feats = torch.cat([wk[:, other].reshape(-1, d), rot[1:, res].reshape(-1, d)])
    place = torch.zeros(g, nope_dims.numel(), feats.shape[0], dtype=wk.dtype)
    for h in range(g):
        place[h, torch.arange(n_o), h * n_o + torch.arange(n_o)] = 1
        for j in range(1, g):
            place[h, n_o + torch.arange(n_r), g * n_o + (j - 1) * n_r + torch.arange(n_r)] = b[res, h, j]
    scale = b[:, :, 0].T[k_map]  # [H, dr] B[g(i), 0] per query head and kept dim
    out = {"w_kr": rot[:1], "feats": feats, "place": place,
           "w_q": torch.cat([wq[:, nope_dims], scale[..., None] * wq[:, keep]], dim=1)}
    out["b_kr"] = out["b_feats"] = out["b_q"] = None
    if bk is not None:
        rot_b = torch.einsum("cjg,gc->jc", a, bk[:, keep])
        out["b_kr"], out["b_feats"] = rot_b[:1], torch.cat([bk[:, other].reshape(-1), rot_b[1:, res].reshape(-1)])
    if bq is not None:
        out["b_q"] = torch.cat([bq[:, nope_dims], scale * bq[:, keep]], dim=1)
    return out
