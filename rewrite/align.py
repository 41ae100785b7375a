"""Exact head alignment before merging (METHODS.md card 2), and head grouping.

Every KV head m may be re-expressed by an invertible map without changing the site:

    K:  W_k^m ← T_m W_k^m,  b_k^m ← T_m b_k^m,  W_q^r ← T_m^{-T} W_q^r (readers r: k_map[r] = m)
        so (T^{-T} q)ᵀ (T k) = qᵀ k;  T must commute with the head transform (RoPE): on each
        frequency pair a scaled 2×2 rotation, on non-rotary dims any invertible map;
    V:  W_v^m ← S_m W_v^m,  b_v^m ← S_m b_v^m,  W_o^r ← W_o^r S_m^{-1}   so W_o S^{-1} S v = W_o v.

We take T = R·A: A = M^{1/2} "whitens" the metric the merge error is measured in (M: the readers'
query second moment for K, Σ W_oᵀW_o for V), so that ‖A e‖² is the error in logits / in the
output; R is orthogonal, from generalised Procrustes against the group's running mean. After
alignment, mean-pooling a group minimises Σ_members E‖pooled − aligned member‖².

``align_heads`` returns the aligned, re-ordered but *unpooled* op: it equals the original to round-off.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from .calibrate import InputStats, head_grams
from .heads import rebuild
from .ir import Attention

__all__ = ["Pairing", "key_pairing", "value_pairing", "procrustes", "KVMoments", "kv_moments",
           "aligned_distance", "equal_groups", "generalized_procrustes", "group_residual",
           "apply_head_maps", "permute_heads", "align_heads"]


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Which maps of a head's d dims keep the site exact.

    ``pairs [P, 2]``: dims turned together by a 2×2 rotation (RoPE frequency pairs);
    ``free [F]``: dims any orthogonal map may mix; every other dim is kept as it is.
    """

    dim: int
    pairs: torch.Tensor
    free: torch.Tensor


def key_pairing(op: Attention) -> Pairing:
    """Rotations of K heads that commute with the site's q/k transforms."""
    d = op.head_dim
    if op.q_transform is None and op.k_transform is None:
        return Pairing(d, torch.zeros(0, 2, dtype=torch.long), torch.arange(d))
    rope, r = op.info.rope, op.info.rotary_dims or d
    if op.info.qk_norm or rope not in ("rotate_half", "interleaved"):
        return Pairing(d, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))  # identity
    half = torch.arange(r // 2)
    pairs = (torch.stack([half, half + r // 2], 1) if rope == "rotate_half"  # (j, j + r/2)
             else torch.stack([2 * half, 2 * half + 1], 1))  # (2j, 2j + 1)
    return Pairing(d, pairs, torch.arange(r, d))


def value_pairing(op: Attention) -> Pairing:
    return Pairing(op.v_head_dim, torch.zeros(0, 2, dtype=torch.long), torch.arange(op.v_head_dim))


def _fixed_dims(p: Pairing) -> torch.Tensor:
    used = torch.zeros(p.dim, dtype=torch.bool)
    used[p.pairs.flatten()] = True
    used[p.free] = True
    return (~used).nonzero().flatten()


def procrustes(m: torch.Tensor, p: Pairing):
    """argmax over allowed orthogonal R of tr(R M), batched over M [..., d, d]; returns (R, max value).

    Free block: R = V Uᵀ from M = U S Vᵀ; each pair: the 2×2 rotation (c, s) ∝ (M00 + M11, M01 − M10).
    """
    rot = torch.zeros_like(m)
    value = m.new_zeros(m.shape[:-2])
    f = p.free
    if f.numel():
        u, s, vh = torch.linalg.svd(m[..., f[:, None], f[None, :]])
        rot[..., f[:, None], f[None, :]] = vh.transpose(-1, -2) @ u.transpose(-1, -2)
        value = value + s.sum(-1)
    if p.pairs.numel():
        i, j = p.pairs[:, 0], p.pairs[:, 1]
        a, b = m[..., i, i] + m[..., j, j], m[..., i, j] - m[..., j, i]
        r = torch.hypot(a, b)
        c = torch.where(r > 0, a / r.clamp_min(1e-300), torch.ones_like(r))
        s = torch.where(r > 0, b / r.clamp_min(1e-300), torch.zeros_like(r))
        rot[..., i, i], rot[..., j, j], rot[..., i, j], rot[..., j, i] = c, c, -s, s
        value = value + r.sum(-1)
    k = _fixed_dims(p)
    if k.numel():
        rot[..., k, k] = 1.0
        value = value + m[..., k, k].sum(-1)
    return rot, value


def _sqrt_metric(m: torch.Tensor, p: Pairing, eps: float = 1e-6) -> torch.Tensor:
    """A [..., d, d] with AᵀA ≈ M, restricted to maps that commute like the pairing allows."""
    d = m.shape[-1]
    a = torch.eye(d, dtype=m.dtype).expand(*m.shape[:-2], d, d).clone()
    ridge = eps * torch.diagonal(m, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    f = p.free
    if f.numel():
        sub = m[..., f[:, None], f[None, :]]
        w, q = torch.linalg.eigh(sub)
        w = w.clamp_min(0) + ridge[..., None]
        a[..., f[:, None], f[None, :]] = q @ torch.diag_embed(w.sqrt()) @ q.transpose(-1, -2)
    if p.pairs.numel():
        i, j = p.pairs[:, 0], p.pairs[:, 1]
        s = ((m[..., i, i] + m[..., j, j]) / 2 + ridge[..., None]).sqrt()  # a scaled identity per pair
        a[..., i, i], a[..., j, j] = s, s
    return a


def _diag_moments(w, b, st: InputStats) -> torch.Tensor:
    """E[y_h y_hᵀ] for every head at once, y_h = W_h x + b_h: [H, d, d]."""
    w = w.double()
    m = torch.einsum("hdk,kl,hel->hde", w, st.gram, w) / max(st.count, 1)
    if b is not None:
        mu = torch.einsum("hdk,k->hd", w, st.total) / max(st.count, 1)
        b = b.double()
        m = m + mu[:, :, None] * b[:, None, :] + b[:, :, None] * mu[:, None, :] + b[:, :, None] * b[:, None, :]
    return m


def _reader_sum(per_reader: torch.Tensor, kv_map: torch.Tensor, n_kv: int) -> torch.Tensor:
    out = per_reader.new_zeros(n_kv, *per_reader.shape[1:])
    return out.index_add_(0, kv_map, per_reader)


@dataclasses.dataclass
class KVMoments:
    """Whitened cross-head moments of one site: ck [Hk,Hk,d,d], cv [Hv,Hv,dv,dv] and the maps A."""

    ck: torch.Tensor
    cv: torch.Tensor
    ak: torch.Tensor  # [Hk, d, d]
    av: torch.Tensor  # [Hv, dv, dv]
    kp: Pairing
    vp: Pairing


@torch.no_grad()
def kv_moments(op: Attention, st: InputStats, whiten: bool = False) -> KVMoments:
    """E[(A_i y_i)(A_j y_j)ᵀ] for keys and values (fp64), with A the metric square roots (I unless whiten).

    Keys without a position-dependent transform use the centred covariance: a key offset shared by
    every token shifts all logits of a query equally, which softmax ignores. Values keep the
    uncentred moment (attention does not average tokens uniformly, so the token mean is not what it reads).
    """
    kp, vp = key_pairing(op), value_pairing(op)
    n = max(st.count, 1)
    if op.k_transform is None:
        ck = head_grams(op.wk, None, st.gram / n - torch.outer(st.total, st.total) / n ** 2, None, 1)
    else:
        ck = head_grams(op.wk, op.bk, st.gram, st.total, st.count)
    cv = head_grams(op.wv, op.bv, st.gram, st.total, st.count)
    ak = torch.eye(op.head_dim, dtype=torch.float64).expand(op.k_heads, -1, -1)
    av = torch.eye(op.v_head_dim, dtype=torch.float64).expand(op.v_heads, -1, -1)
    if whiten:  # measured worse than plain moments on MiniLM; kept for study
        wo = op.wo.detach().double().permute(1, 0, 2)  # (Hq, Do, dv)
        av = _sqrt_metric(_reader_sum(wo.transpose(1, 2) @ wo, op.v_map, op.v_heads), vp)
        if not op.info.cross:  # the statistics are of the key/value input, which queries share here
            ak = _sqrt_metric(_reader_sum(_diag_moments(op.wq.detach(), op.bq, st), op.k_map, op.k_heads), kp)
    ck = torch.einsum("iab,ijbc,jdc->ijad", ak, ck, ak)
    cv = torch.einsum("iab,ijbc,jdc->ijad", av, cv, av)
    return KVMoments(ck, cv, ak, av, kp, vp)


def aligned_distance(c: torch.Tensor, p: Pairing) -> torch.Tensor:
    """min_R E‖R y_i − y_j‖² = tr C_ii + tr C_jj − 2 max_R tr(R C_ij), for all pairs: [H, H]."""
    energy = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1).diagonal()
    _, best = procrustes(c, p)
    return (energy[:, None] + energy[None, :] - 2 * best).clamp_min(0)


def equal_groups(dist: torch.Tensor, n_groups: int, seed: int = 0, restarts: int = 16) -> list:
    """Equal-size groups minimising the summed within-group distance (pair swaps from seeded starts)."""
    d = dist.double().cpu().numpy()
    h = d.shape[0]
    size = h // n_groups
    rng = np.random.default_rng(seed)
    starts = [np.arange(h) // size] + [rng.permutation(h) // size for _ in range(restarts)]
    best, best_cost = None, np.inf
    for lab in starts:
        lab = lab.copy()
        onehot = np.eye(n_groups)[lab]
        for _ in range(h * h):
            s = d @ onehot  # s[i, g] = Σ_{k∈g} d_ik
            own = s[np.arange(h), lab]
            # gain of swapping i and j: Δ = s[i,g_j] − s[i,g_i] + s[j,g_i] − s[j,g_j] − 2 d_ij
            delta = s[:, lab] - own[:, None] + s[:, lab].T - own[None, :] - 2 * d
            delta[lab[:, None] == lab[None, :]] = 0
            i, j = np.unravel_index(np.argmin(delta), delta.shape)
            if delta[i, j] > -1e-12 * max(d.max(), 1e-30):
                break
            lab[i], lab[j] = lab[j], lab[i]
            onehot = np.eye(n_groups)[lab]
        cost = float((d * (lab[:, None] == lab[None, :])).sum())
        if cost < best_cost - 1e-12 * max(abs(cost), 1.0):
            best, best_cost = lab, cost
    groups = [sorted(np.flatnonzero(best == g).tolist()) for g in range(n_groups)]
    return sorted(groups)


def _member_weights(labels: torch.Tensor) -> torch.Tensor:
    same = (labels[:, None] == labels[None, :]).double()
    return same / same.sum(1, keepdim=True)  # w[m, n] = 1/|g| when m, n share group g


def generalized_procrustes(c: torch.Tensor, labels: torch.Tensor, p: Pairing, iters: int = 30,
                           tol: float = 1e-6) -> torch.Tensor:
    """Rotations R [H, d, d] aligning every head to its group's running mean t_g = mean_n R_n y_n."""
    h, d = c.shape[0], c.shape[-1]
    w = _member_weights(labels)
    rot = torch.eye(d, dtype=c.dtype).repeat(h, 1, 1)
    last = -np.inf
    for _ in range(iters):
        x = torch.einsum("mn,mnab,ncb->mac", w, c, rot)  # E[y_m t_gᵀ]
        rot, value = procrustes(x, p)
        total = float(value.sum())
        if total - last <= tol * max(abs(total), 1e-30):
            break
        last = total
    return rot


def group_residual(c: torch.Tensor, labels: torch.Tensor, rot: torch.Tensor) -> float:
    """Σ_m E‖t_g − R_m y_m‖² after mean-pooling the aligned heads = Σ tr C_mm − Σ tr(R_m X_m)."""
    w = _member_weights(labels)
    x = torch.einsum("mn,mnab,ncb->mac", w, c, rot)
    energy = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1).diagonal()
    return float(energy.sum() - torch.einsum("mab,mba->", rot, x))


@torch.no_grad()
def apply_head_maps(op: Attention, tk: Optional[torch.Tensor] = None, tv: Optional[torch.Tensor] = None) -> Attention:
    """The exact re-expression: K heads by T_k [Hk,d,d] (queries by T_k^{-T}), V heads by T_v (W_o by T_v^{-1})."""
    f = {}
    if tk is not None:
        tk = tk.double()
        tq = torch.linalg.inv(tk).transpose(-1, -2)[op.k_map]  # (Hq, d, d)
        f["wk"] = (tk @ op.wk.double()).to(op.wk.dtype)
        f["wq"] = (tq @ op.wq.double()).to(op.wq.dtype)
        if op.bk is not None:
            f["bk"] = (tk @ op.bk.double()[..., None])[..., 0].to(op.bk.dtype)
        if op.bq is not None:
            f["bq"] = (tq @ op.bq.double()[..., None])[..., 0].to(op.bq.dtype)
    if tv is not None:
        tv = tv.double()
        inv = torch.linalg.inv(tv)[op.v_map]  # (Hq, dv, dv)
        f["wv"] = (tv @ op.wv.double()).to(op.wv.dtype)
        f["wo"] = torch.einsum("ohd,hde->ohe", op.wo.double(), inv).to(op.wo.dtype)
        if op.bv is not None:
            f["bv"] = (tv @ op.bv.double()[..., None])[..., 0].to(op.bv.dtype)
    return rebuild(op, **f)


@torch.no_grad()
def permute_heads(op: Attention, kv_order: Sequence[int]) -> Attention:
    """Exact: KV heads (K and V together) in ``kv_order``, query heads re-ordered so each KV head's
    readers stay contiguous (W_q rows, W_o columns and the maps move together)."""
    kv_order = torch.as_tensor(list(kv_order), dtype=torch.long)
    inv = torch.empty_like(kv_order)
    inv[kv_order] = torch.arange(kv_order.numel())
    new_kv = inv[op.k_map]
    q_order = torch.argsort(new_kv * op.q_heads + torch.arange(op.q_heads))  # stable by new KV head
    b = (lambda t: None if t is None else t[kv_order])
    return rebuild(op, wq=op.wq[q_order], bq=None if op.bq is None else op.bq[q_order], wo=op.wo[:, q_order],
                   wk=op.wk[kv_order], bk=b(op.bk), wv=op.wv[kv_order], bv=b(op.bv),
                   k_map=inv[op.k_map[q_order]], v_map=inv[op.v_map[q_order]])


@torch.no_grad()
def align_heads(op: Attention, st: InputStats, n_groups: int, whiten: bool = False, seed: int = 0,
                reorder: bool = True):
    """Group the KV heads of a site (K and V shared, equal sizes) and align each group, without pooling.

    Returns (aligned op, groups in the aligned op's numbering, groups in the original numbering).
    The aligned op equals ``op`` to round-off; ``pool_kv(aligned, groups)`` is the merge.
    """
    mom = kv_moments(op, st, whiten)
    dk, dv = aligned_distance(mom.ck, mom.kp), aligned_distance(mom.cv, mom.vp)
    energy = (lambda c: float(torch.einsum("iiaa->", c)) + 1e-30)
    dist = dk / energy(mom.ck) + dv / energy(mom.cv)  # each relative to its total energy
    groups = equal_groups(dist, n_groups, seed)
    labels = torch.empty(op.k_heads, dtype=torch.long)
    for g, members in enumerate(groups):
        labels[members] = g
    rk = generalized_procrustes(mom.ck, labels, mom.kp)
    rv = generalized_procrustes(mom.cv, labels, mom.vp)
    new = apply_head_maps(op, rk @ mom.ak, rv @ mom.av)
    if not reorder:
        return new, groups, groups
    order = [j for members in groups for j in members]
    size = op.k_heads // n_groups
    return permute_heads(new, order), [list(range(g * size, (g + 1) * size)) for g in range(n_groups)], groups
