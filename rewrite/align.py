"""Exact head alignment before merging (METHODS.md card 2), and head grouping.

Every KV head m may be re-expressed by an invertible map without changing the site:

    K:  W_k^m ← T_m W_k^m,  b_k^m ← T_m b_k^m,  W_q^r ← T_m^{-T} W_q^r  (readers r: k_map[r] = m)
        so (T^{-T} q)ᵀ (T k) = qᵀ k; T must commute with the head transform: with RoPE a 2×2 rotation
        (det +1) on each frequency pair and any orthogonal map on non-rotary dims;
    V:  W_v^m ← S_m W_v^m,  b_v^m ← S_m b_v^m,  W_o^r ← W_o^r S_m^{-1}   so W_o S^{-1} S v = W_o v.

Alignment uses orthogonal T = R_m from generalised Procrustes against the group's running mean
t_g = mean_{n∈g} R_n y_n, on calibration second moments C_mn = E[y_m y_nᵀ]. Mean-pooling the aligned
heads then loses Σ_m E‖t_g − R_m y_m‖² instead of Σ_m E‖ȳ − y_m‖².

``align_heads`` returns the aligned, re-ordered but *unpooled* op: it equals the original to round-off.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .calibrate import InputStats, head_grams
from .heads import query_fields, rebuild
from .ir import Attention

__all__ = ["Pairing", "key_pairing", "value_pairing", "procrustes", "kv_moments", "head_distance",
           "equal_groups", "generalized_procrustes", "group_residual", "apply_head_maps", "permute_heads",
           "align_heads", "Alignment", "labels_of", "head_self_moments", "reader_sum", "fusion_weights", "reader_metrics"]

_NO_PAIRS = torch.zeros(0, 2, dtype=torch.long)


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Which orthogonal maps of a head's ``dim`` dims keep the site exact.

    ``pairs [P, 2]``: dims turned together by a 2×2 rotation (RoPE frequency pairs);
    ``free [F]``: dims any orthogonal map may mix; ``fixed``: every other dim, kept as it is.
    """

    dim: int
    pairs: torch.Tensor
    free: torch.Tensor

    @property
    def fixed(self) -> torch.Tensor:
        used = torch.zeros(self.dim, dtype=torch.bool)
        used[self.pairs.flatten()] = True
        used[self.free] = True
        return (~used).nonzero().flatten()


def key_pairing(op: Attention) -> Pairing:
    """Rotations of K heads that commute with the site's q/k transforms (RoPE layout from ``op.info``)."""
    d = op.head_dim
    if op.q_transform is None and op.k_transform is None:
        return Pairing(d, _NO_PAIRS, torch.arange(d))
    rope, r = op.info.rope, op.info.rotary_dims or d
    if op.info.qk_norm or rope not in ("rotate_half", "interleaved"):  # a norm's per-dim gain does not commute
        return Pairing(d, _NO_PAIRS, torch.zeros(0, dtype=torch.long))
    half = torch.arange(r // 2)
    pairs = (torch.stack([half, half + r // 2], 1) if rope == "rotate_half"  # (j, j + r/2)
             else torch.stack([2 * half, 2 * half + 1], 1))  # (2j, 2j + 1)
    return Pairing(d, pairs, torch.arange(r, d))


def value_pairing(op: Attention) -> Pairing:
    """Any orthogonal map of V heads, unless a value transform (a v norm's gains) sits before the core."""
    if op.v_transform is not None:
        return Pairing(op.v_head_dim, _NO_PAIRS, torch.zeros(0, dtype=torch.long))
    return Pairing(op.v_head_dim, _NO_PAIRS, torch.arange(op.v_head_dim))


def procrustes(m: torch.Tensor, p: Pairing):
    """argmax over allowed orthogonal R of tr(R M), batched over M [..., d, d]; returns (R, max value).

    Free block: R = V Uᵀ from M = U S Vᵀ; each pair: the rotation (c, s) ∝ (M00 + M11, M01 − M10).
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
    k = p.fixed
    if k.numel():
        rot[..., k, k] = 1.0
        value = value + m[..., k, k].sum(-1)
    return rot, value


def head_self_moments(w, b, st: InputStats) -> torch.Tensor:
    """E[y_h y_hᵀ] for every head at once, y_h = W_h x + b_h: [H, d, d] (fp64)."""
    w = w.detach().double()
    m = torch.einsum("hdk,kl,hel->hde", w, st.gram, w) / max(st.count, 1)
    if b is not None:
        mu = torch.einsum("hdk,k->hd", w, st.total) / max(st.count, 1)
        b = b.detach().double()
        m = m + mu[:, :, None] * b[:, None, :] + b[:, :, None] * mu[:, None, :] + b[:, :, None] * b[:, None, :]
    return m


def reader_sum(per_reader: torch.Tensor, kv_map: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Σ over the query heads reading each KV head: [Hq, ...] -> [n_kv, ...]."""
    return per_reader.new_zeros(n_kv, *per_reader.shape[1:]).index_add_(0, kv_map, per_reader)


@torch.no_grad()
def kv_moments(op: Attention, st: InputStats):
    """Cross-head moments (fp64) of keys ``ck [Hk,Hk,d,d]`` and values ``cv [Hv,Hv,dv,dv]``.

    Keys without a position-dependent transform use the centred covariance: a key offset shared by
    every token shifts all logits of a query equally, which softmax ignores. Values keep the
    uncentred moment (attention does not average tokens uniformly; centring measured worse).
    """
    n = max(st.count, 1)
    wk, wv = op.wk.detach(), op.wv.detach()
    if op.k_transform is None:
        ck = head_grams(wk, None, st.gram / n - torch.outer(st.total, st.total) / n ** 2, None, 1)
    else:
        ck = head_grams(wk, None if op.bk is None else op.bk.detach(), st.gram, st.total, st.count)
    cv = head_grams(wv, None if op.bv is None else op.bv.detach(), st.gram, st.total, st.count)
    return ck, cv


def head_distance(c: torch.Tensor, p: Pairing):
    """Normalised distance after optimal alignment, 2 − 2‖C_ij‖_R / √(tr C_ii tr C_jj) ∈ [0, 2], with
    ‖·‖_R the constrained nuclear norm (max_R tr(R C_ij)); also the pairwise rotations R[i, j] (i onto j)."""
    energy = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1).diagonal().clamp_min(1e-300)
    rot, best = procrustes(c, p)
    return (2 - 2 * best / (energy[:, None] * energy[None, :]).sqrt()).clamp_min(0), rot


def equal_groups(dist: torch.Tensor, n_groups: int, seed: int = 0, restarts: int = 8) -> list:
    """Equal-size groups (sizes differing by at most one when ``n_groups`` does not divide the heads) minimising
    the summed within-group distance (best pair swaps, seeded starts)."""
    d = dist.detach().double().cpu().numpy()
    h = d.shape[0]
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for lab in [np.arange(h) * n_groups // h] + [rng.permutation(h) * n_groups // h for _ in range(restarts)]:
        for _ in range(h * h):
            s = d @ np.eye(n_groups)[lab]  # s[i, g] = Σ_{k∈g} d_ik
            own = s[np.arange(h), lab]
            # swapping i and j changes the cost by s[i,g_j] − s[i,g_i] + s[j,g_i] − s[j,g_j] − 2 d_ij
            delta = s[:, lab] - own[:, None] + s[:, lab].T - own[None, :] - 2 * d
            delta[lab[:, None] == lab[None, :]] = 0
            i, j = np.unravel_index(np.argmin(delta), delta.shape)
            if delta[i, j] > -1e-12 * max(d.max(), 1e-30):
                break
            lab[i], lab[j] = lab[j], lab[i]
        cost = float((d * (lab[:, None] == lab[None, :])).sum())
        if cost < best_cost - 1e-12 * max(abs(cost), 1.0):
            best, best_cost = lab, cost
    return sorted(sorted(np.flatnonzero(best == g).tolist()) for g in range(n_groups))


def labels_of(groups: Sequence[Sequence[int]], h: int) -> torch.Tensor:
    labels = torch.empty(h, dtype=torch.long)
    for g, members in enumerate(groups):
        labels[list(members)] = g
    return labels


def _member_weights(labels: torch.Tensor) -> torch.Tensor:
    same = (labels[:, None] == labels[None, :]).double()
    return same / same.sum(1, keepdim=True)  # w[m, n] = 1/|g| when m and n share group g


def _to_group_mean(w: torch.Tensor, c: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """X_m = Σ_n w_mn C_mn R_nᵀ = E[y_m t_gᵀ], over the pairs (m, n) of one group only (w is zero elsewhere)."""
    m, n = w.nonzero(as_tuple=True)
    terms = (c[m, n] @ rot[n].transpose(-1, -2)) * w[m, n, None, None]
    return c.new_zeros(c.shape[0], *terms.shape[1:]).index_add_(0, m, terms)


def generalized_procrustes(c: torch.Tensor, labels: torch.Tensor, p: Pairing, pairwise: Optional[torch.Tensor] = None,
                           dist: Optional[torch.Tensor] = None, iters: int = 30, tol: float = 1e-6) -> torch.Tensor:
    """Rotations R [H, d, d] aligning every head to its group's running mean t_g = mean_n R_n y_n.

    Starts from each head aligned onto its group's medoid (``pairwise``/``dist`` from ``head_distance``).
    """
    h, d = c.shape[0], c.shape[-1]
    w = _member_weights(labels)
    if pairwise is not None and dist is not None:
        spread = (dist * (w > 0)).sum(1)  # Σ distance to the rest of the group
        ref = torch.empty(h, dtype=torch.long)
        for g in labels.unique():
            members = (labels == g).nonzero().flatten()
            ref[members] = members[spread[members].argmin()]
        rot = pairwise[torch.arange(h), ref]
    else:
        rot = torch.eye(d, dtype=c.dtype).repeat(h, 1, 1)
    last = -np.inf
    for _ in range(iters):
        x = _to_group_mean(w, c, rot)  # E[y_m t_gᵀ]
        rot, value = procrustes(x, p)
        total = float(value.sum())
        if total - last <= tol * max(abs(total), 1e-30):
            break
        last = total
    return rot


def group_residual(c: torch.Tensor, labels: torch.Tensor, rot: torch.Tensor) -> float:
    """Σ_m E‖t_g − R_m y_m‖² after mean-pooling the aligned heads = Σ tr C_mm − Σ tr(R_m X_m)."""
    x = _to_group_mean(_member_weights(labels), c, rot)
    energy = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1).diagonal()
    return float(energy.sum() - torch.einsum("mab,mba->", rot, x))


@torch.no_grad()
def apply_head_maps(op: Attention, tk: Optional[torch.Tensor] = None, tv: Optional[torch.Tensor] = None) -> Attention:
    """The exact re-expression: K heads by T_k [Hk,d,d] (queries by T_k^{-T}), V heads by T_v (W_o by T_v^{-1})."""
    f = {}

    def mv(t, b):  # per-head matrix-vector product on a bias [H, d]
        return None if b is None else (t @ b.double()[..., None])[..., 0].to(b.dtype)

    if tk is not None:
        tk = tk.double()
        tq = torch.linalg.inv(tk).transpose(-1, -2)[op.k_map]  # (Hq, d, d)
        f.update(wk=(tk @ op.wk.double()).to(op.wk.dtype), wq=(tq @ op.wq.double()).to(op.wq.dtype),
                 bk=mv(tk, op.bk), bq=mv(tq, op.bq))
    if tv is not None:
        tv = tv.double()
        inv = torch.linalg.inv(tv)[op.v_map]  # (Hq, dv, dv)
        f.update(wv=(tv @ op.wv.double()).to(op.wv.dtype), bv=mv(tv, op.bv),
                 wo=torch.einsum("ohd,hde->ohe", op.wo.double(), inv).to(op.wo.dtype))
    return rebuild(op, **f)


@torch.no_grad()
def permute_heads(op: Attention, kv_order: Sequence[int]) -> Attention:
    """Exact: KV heads (K and V together) in ``kv_order``, query heads re-ordered so each KV head's
    readers stay contiguous (W_q rows, b_q, W_o columns and the maps move together)."""
    kv_order = torch.as_tensor(list(kv_order), dtype=torch.long)
    inv = torch.empty_like(kv_order)
    inv[kv_order] = torch.arange(kv_order.numel())
    q_order = torch.argsort(inv[op.k_map] * op.q_heads + torch.arange(op.q_heads))  # stable by new KV head
    pick = (lambda t, i: None if t is None else t[i])
    return rebuild(op, **query_fields(op, q_order),
                   wk=op.wk[kv_order], bk=pick(op.bk, kv_order), wv=op.wv[kv_order], bv=pick(op.bv, kv_order),
                   k_map=inv[op.k_map[q_order]], v_map=inv[op.v_map[q_order]])


class Alignment(NamedTuple):
    op: Attention  # aligned and re-ordered, not pooled: equals the original to round-off
    groups: list  # in ``op``'s numbering (contiguous when re-ordered)
    original_groups: list  # in the original numbering
    residual: dict  # relative pooling residual Σ E‖t_g − R y‖² / Σ E‖y‖², K and V, without and with alignment


@torch.no_grad()
def align_heads(op: Attention, st: InputStats, n_groups: int, seed: int = 0, reorder: bool = True) -> Alignment:
    """Group a site's KV heads (K and V share groups, equal sizes) and align each group, without pooling.

    ``pool_kv(result.op, result.groups)`` is the merge.
    """
    ck, cv = kv_moments(op, st)
    kp, vp = key_pairing(op), value_pairing(op)
    dk, pk = head_distance(ck, kp)
    dv, pv = head_distance(cv, vp)
    groups = equal_groups(dk + dv, n_groups, seed)
    labels = labels_of(groups, op.k_heads)
    rk = generalized_procrustes(ck, labels, kp, pk, dk)
    rv = generalized_procrustes(cv, labels, vp, pv, dv)
    residual = {}
    for kind, c, r in (("k", ck, rk), ("v", cv, rv)):
        energy = float(torch.einsum("iiaa->", c)) or 1.0
        eye = torch.eye(c.shape[-1], dtype=c.dtype).expand_as(r)
        residual[kind] = [round(group_residual(c, labels, t) / energy, 4) for t in (eye, r)]
    new = apply_head_maps(op, rk, rv)
    if not reorder:
        return Alignment(new, groups, groups, residual)
    size = op.k_heads // n_groups
    new = permute_heads(new, [j for members in groups for j in members])
    return Alignment(new, [list(range(g * size, (g + 1) * size)) for g in range(n_groups)], groups, residual)


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


def reader_metrics(op: Attention, st: InputStats) -> tuple:
    """The metrics the readers of each KV head see its error in: Σ_r E[q_r q_rᵀ] for a K head (the query heads
    reading it) and Σ_r W_o^rᵀ W_o^r for a V head, ``([Hk, d, d], [Hv, dv, dv])`` in fp64."""
    wo = op.wo.detach().double().permute(1, 0, 2)  # (Hq, Do, dv)
    return (reader_sum(head_self_moments(op.wq, op.bq, st), op.k_map, op.k_heads),
            reader_sum(wo.transpose(1, 2) @ wo, op.v_map, op.v_heads))
