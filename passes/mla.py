"""mla{kv_rank, rope_dims, method=mha2mla|transmla}: MHA/GQA sites become multi-head latent attention.

Per KV head g, the RoPE frequency pairs F_g (rope_dims/2 of them) stay rotary; the other dims of the head become
"nope" dims (their RoPE is dropped). The non-RoPE keys and the values of every KV head are stacked,

    M = [W_k,nope^0; …; W_k,nope^{G-1}; W_v^0; …; W_v^{G-1}]   (N = G·(dh − rope_dims) + G·dv rows),

and factorised to rank r = kv_rank: M ≈ W_up W_dkv, so c = W_dkv x is cached with k^r_g = RoPE(W_k,rope^g x):

- r = N and rope_dims = the rotary dims (the defaults): W_dkv = M and W_up the block identities (TransMLA's
  exact GQA→MLA form), checked to round-off;
- rope_dims below: F_g are the pairs of largest RMS(q_f)·RMS(k_f) summed over the group's query heads, from the
  calibration grams (MHA2MLA's 2-norm selection; RoPE keeps pair norms, so pre-RoPE statistics serve);
- r below N: the whitened truncated SVD of M·L (L Lᵀ = E[x xᵀ] on calibration), after scaling the key rows by
  α = RMS(v)/RMS(k_nope) so K and V weigh the same (TransMLA's K/V balancing); W_up's key rows are divided by α.

``method`` says how RoPE is kept: ``mha2mla`` (``rope_dims`` per KV head, the 2-norm selection above, one RoPE
key per KV head); ``transmla`` (RoRoPE, ``rewrite.rorope``: each kept frequency plane is rotated across the KV
heads by the PCA of the calibration keys, heads weighed by their queries' energy, and its first component is one
RoPE key shared by every head, the DeepSeek-V3 form; of the other components, those of the lower-frequency half
of the pairs join the latent without RoPE, those of the higher half are dropped, ``rest_dims``). transmla keeps
``rope_dims`` in the shared key: the first rope_dims/2 frequency pairs (the highest frequencies, the only subset
DeepSeek's RoPE with theta' = theta^(rope_dims/rotary_dims) expresses), default every rotary pair; the other
pairs stay per head without RoPE. The cache is r + rope_dims values. It is exact for G = 1 (MQA) at full rank
and needs calibration otherwise.

Biases move to the up-projection (b_uk, b_uv) and the RoPE key (b_kr). Lossy settings need calibration.
Refused: odd rope_dims (SpecError); per site (a skip, SpecError when no site can take it): rope_dims above the
head's rotary dims, rope_dims > 0 on a site without RoPE, a partial RoPE under a q/k norm (transmla: any q/k norm
or unread RoPE layout), kv_rank above N, cross-attention, score functions, head gates and per-head score biases.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import nn

from rewrite.calibrate import head_grams, input_grams
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites
from rewrite.latent import LatentAttention, is_latent
from rewrite.rorope import plane_mixes, split_keys
from rewrite.pass_base import Diagnostic, Pass, register, rewrite_each_site

__all__ = ["MLA", "PartialRope", "convert_site"]

METHODS = ("mha2mla", "transmla")


class PartialRope(nn.Module):
    """A head's RoPE on a subset of its dims: y = P_idx · T(P_idxᵀ x), idx ``[H, d_rope]`` per head.

    Exact for the kept dims when idx holds whole frequency pairs (RoPE rotates within pairs)."""

    def __init__(self, transform: nn.Module, index: torch.Tensor, head_dim: int):
        super().__init__()
        self.transform, self.head_dim = transform, int(head_dim)
        self.n_side = transform.n_side
        self.register_buffer("index", index.long().contiguous())  # an expanded selection would not save

    def forward(self, x, *side):
        b, h, s, d = x.shape
        idx = self.index[None, :, None, :].expand(b, h, s, d)
        full = x.new_zeros(b, h, s, self.head_dim).scatter(-1, idx, x)
        return self.transform(full, *side).gather(-1, idx)


def _pairs(op) -> Optional[torch.Tensor]:
    """``[P, 2]`` the dims each RoPE frequency rotates together, or None when the layout is unknown."""
    rd = op.info.rotary_dims
    if op.info.rope == "rotate_half":
        return torch.stack([torch.arange(rd // 2), torch.arange(rd // 2) + rd // 2], 1)
    if op.info.rope == "interleaved":
        return torch.arange(rd).reshape(-1, 2)
    return None


def _refusal(op, rope_dims: int, kv_rank: Optional[int], method: str = "mha2mla") -> Optional[str]:
    name, dh = op.info.name, op.head_dim
    if op.info.cross:
        return f"{name}: cross-attention (keys from another sequence); mla needs self-attention"
    if op.score_fn is not None or op.head_gate is not None or op.bias_map is not None:
        return f"{name}: a score function, head gate or per-head score bias; run mla before the passes adding them"
    if op.k_heads != op.v_heads or not torch.equal(op.k_map, op.v_map):
        return f"{name}: keys and values use different head maps (dha?); mla needs shared KV heads"
    if rope_dims > dh:
        return f"{name}: rope_dims={rope_dims} is larger than its head size {dh}"
    if op.info.rope is None and rope_dims > 0:
        return f"{name}: has no RoPE, so rope_dims={rope_dims} has nothing to keep; use rope_dims=0"
    if rope_dims and rope_dims > op.info.rotary_dims and rope_dims != dh:
        return f"{name}: rope_dims={rope_dims} is more than its {op.info.rotary_dims} rotary dims"
    if 0 < rope_dims < dh and (op.info.qk_norm or _pairs(op) is None):
        return (f"{name}: keeping rope_dims={rope_dims} of {dh} needs a pure RoPE on q and k (this site has "
                f"{'a q/k norm' if op.info.qk_norm else 'a RoPE layout that could not be read'}); use rope_dims={dh}")
    if method == "transmla" and rope_dims and (op.info.qk_norm or _pairs(op) is None or rope_dims > op.info.rotary_dims):
        why = ("a q/k norm" if op.info.qk_norm else "a RoPE layout that could not be read" if _pairs(op) is None
               else f"only {op.info.rotary_dims} rotary dims")
        return (f"{name}: mla{{method=transmla}} rotates the RoPE frequency planes across KV heads, which needs a pure "
                f"RoPE on q and k with rope_dims ≤ its rotary dims (this site has {why}); use method=mha2mla")
    for t in (op.q_transform, op.k_transform, op.v_transform):
        if t is not None and t.heads is not None:
            return f"{name}: a head transform over the whole projection ({t.description}) cannot be split per head"
    if op.v_transform is not None:
        return f"{name}: a value transform ({op.v_transform.description}) is not a linear up-projection"
    if kv_rank is not None and kv_rank > width(op, rope_dims, method):
        return f"{name}: kv_rank={kv_rank} is larger than its non-RoPE K/V width {width(op, rope_dims, method)}"
    return None


def default_rope_dims(op) -> int:
    """Every rotary dim (0 without RoPE; the whole head when its RoPE cannot be split by dims): the exact choice."""
    if op.info.rope is None:
        return 0
    if op.info.qk_norm or _pairs(op) is None:
        return op.head_dim
    return op.info.rotary_dims


def width(op, rope_dims: int, method: str = "mha2mla") -> int:
    """N: the non-RoPE key and value values per token, G·(dh − rope_dims) + G·dv (mha2mla); transmla adds the
    rest of the shared key's lower-frequency pairs, (G − 1)·rest_dims(rope_dims)."""
    shared = (op.k_heads - 1) * rest_dims(rope_dims) if method == "transmla" else 0
    return op.k_heads * (op.head_dim - rope_dims) + op.v_heads * op.v_head_dim + shared


def _select(op, rope_dims: int, stats) -> torch.Tensor:
    """``[G, rope_dims]`` kept dims per KV head: every rotary dim, or the top pairs by RMS(q_f)·RMS(k_f)."""
    dh, g = op.head_dim, op.k_heads
    if rope_dims in (0, dh):
        return torch.arange(rope_dims).expand(g, rope_dims)
    pairs = _pairs(op)
    if rope_dims == pairs.numel():
        return pairs.T.reshape(-1).sort().values.expand(g, rope_dims)
    e_q = _energy(op.wq, op.bq, stats)  # [Hq, dh] E[q²]
    e_k = _energy(op.wk, op.bk, stats)  # [G, dh]
    pq = e_q[:, pairs].sum(-1).sqrt()  # [Hq, P] RMS pair norms
    pk = e_k[:, pairs].sum(-1).sqrt()
    score = torch.zeros(g, pairs.shape[0], dtype=torch.float64).index_add_(0, op.k_map.cpu(), pq) * pk
    top = score.topk(rope_dims // 2, dim=-1).indices  # [G, rope_dims/2]
    return pairs[top].reshape(g, -1).sort(-1).values


def _energy(w, b, stats) -> torch.Tensor:
    m = head_grams(w.detach(), None if b is None else b.detach(), stats.gram, stats.total, stats.count)
    return torch.diagonal(torch.diagonal(m, dim1=0, dim2=1), dim1=0, dim2=1).cpu()  # [H, d] E[y²] per dim


def _rows(w, b, index):  # per head rows: w [H, d, D], index [H, k] -> [H, k, D]
    out = torch.stack([w[h, index[h]] for h in range(w.shape[0])])
    return out, None if b is None else torch.stack([b[h, index[h]] for h in range(b.shape[0])])


def _factor(m: torch.Tensor, k_rows: int, rank: int, stats):
    """(W_up [N, r], W_dkv [r, D], error): M ≈ W_up W_dkv, whitened by E[x xᵀ], K rows balanced against V rows."""
    n = m.shape[0]
    if rank == n or stats is None:
        return torch.eye(n, dtype=m.dtype), m.clone(), 0.0
    md = m.double()
    gram = (stats.gram / max(stats.count, 1)).to(md.device)
    e = torch.einsum("nd,de,ne->n", md, gram, md)  # E[y²] per row
    alpha = float((e[k_rows:].mean() / e[:k_rows].mean().clamp_min(1e-30)).sqrt()) if 0 < k_rows < n else 1.0
    scale = torch.ones(n, dtype=torch.float64)
    scale[:k_rows] = alpha
    ev, evec = torch.linalg.eigh(gram)
    ev = ev.clamp_min(float(ev.max()) * 1e-10)
    root, inv = evec @ torch.diag(ev.sqrt()) @ evec.T, evec @ torch.diag(ev.rsqrt()) @ evec.T  # Σ^{±1/2}
    u, s, vt = torch.linalg.svd((scale[:, None] * md) @ root, full_matrices=False)
    up = u[:, :rank] * s[:rank].sqrt() / scale[:, None]
    down = (s[:rank].sqrt()[:, None] * vt[:rank]) @ inv
    err = float((s[rank:] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))  # residual energy (balanced, whitened)
    return up.to(m.dtype), down.to(m.dtype), err


def convert_site(op, rope_dims: Optional[int], kv_rank: Optional[int], stats, method: str = "mha2mla"):
    """(LatentAttention, stats) for one site (see the module docstring)."""
    dh, dv, g = op.head_dim, op.v_head_dim, op.k_heads
    dr = default_rope_dims(op) if rope_dims is None else rope_dims
    if method == "transmla" and dr:
        return _convert_rorope(op, dr, kv_rank, stats)
    n = width(op, dr)
    rank = n if kv_rank is None else kv_rank
    keep = _select(op, dr, stats)  # [G, dr]
    nope = torch.stack([torch.tensor([j for j in range(dh) if j not in set(keep[h].tolist())], dtype=torch.long)
                        for h in range(g)]) if dr < dh else torch.zeros(g, 0, dtype=torch.long)
    order = torch.cat([nope, keep], dim=1)  # [G, dh]: nope dims first, then RoPE dims
    w_q, b_q = _rows(op.wq, op.bq, order[op.k_map.cpu()])
    w_kr, b_kr = _rows(op.wk, op.bk, keep)
    w_kn, b_kn = _rows(op.wk, op.bk, nope)
    dn = dh - dr
    m = torch.cat([w_kn.reshape(g * dn, op.wk.shape[-1]), op.wv.detach().reshape(g * dv, -1)])
    up, down, err = _factor(m.detach(), g * dn, rank, stats)
    up_k, up_v = up[:g * dn].reshape(g, dn, rank), up[g * dn:].reshape(g, dv, rank)
    kmap = op.k_map.cpu()
    q_rope = k_rope = None
    if dr == dh:
        q_rope, k_rope = op.q_transform, op.k_transform
    elif dr:
        q_rope = PartialRope(op.q_transform, keep[kmap], dh)
        k_rope = PartialRope(op.k_transform, keep, dh)
    new = LatentAttention(
        w_q=w_q, b_q=b_q, w_dkv=down, w_kr=w_kr, b_kr=b_kr, w_uk=up_k[kmap], w_uv=up_v[kmap],
        b_uk=None if b_kn is None else b_kn[kmap], b_uv=None if op.bv is None else op.bv.detach()[kmap], wo=op.wo,
        bo=op.bo, q_rope=q_rope, k_rope=k_rope, rope_map=kmap, scale=op.scale, causal=op.causal,
        info=copy.deepcopy(op.info), softcap=op.softcap)
    new.info.sources = {}  # the source checkpoint's rows no longer describe these weights
    return new, {"kv_rank": rank, "rope_dims": dr, "kv_width": n, "kv_values_before": g * (dh + dv),
                 "kv_values_after": rank + g * dr, "kv_residual_energy": err,
                 "rope_pairs_kept": keep.tolist() if 0 < dr < dh else "all"}


def rest_dims(dr: int) -> int:
    """RoRoPE keeps the rest (z_j, j ≥ 1, without RoPE) of the lower-frequency half of the shared key's pairs
    and drops it for the higher half, whose RoPE turns too fast for an unrotated dot product (on demo-lm at
    1/2 KV: 3.38 bpb against 3.82 keeping every rest and 3.60 dropping every rest). Averaged over phases, keeping
    q·r unrotated errs by 1 − E[cos ωΔ] and dropping it by 1/2, so keeping wins while E[cos ωΔ] > 1/2 over the
    distances Δ: for Δ up to L that is ωL < 1.9, pair 34 of 64 for theta 5e5 at L = 2048, near the half."""
    return 2 * (dr // 2 - dr // 4)


def _convert_rorope(op, dr: int, kv_rank: Optional[int], stats):
    """transmla: one RoPE key shared by all heads (``rewrite.rorope``), the rest factorised with the values."""
    g, dv, kmap = op.k_heads, op.v_head_dim, op.k_map.cpu()
    pairs = _pairs(op)
    kept = pairs[:dr // 2]  # the first pairs: the highest frequencies
    keep = kept.reshape(-1).sort().values  # rotate_half: [0, dr/2) and [rd/2, rd/2 + dr/2); interleaved: [0, dr)
    pair_of = torch.stack([(kept == j).any(-1).nonzero()[0, 0] for j in keep.tolist()])
    wk, bk = op.wk.detach(), None if op.bk is None else op.bk.detach()
    q_energy = None
    if stats is not None and g > 1:  # heads weighed by their queries' energy: 3.38 → 3.35 bpb on demo-lm
        e_q = _energy(op.wq, op.bq, stats)
        q_energy = torch.zeros(g, e_q.shape[1], dtype=e_q.dtype).index_add_(0, kmap, e_q)
    mixes, share = plane_mixes(wk, bk, kept, stats, q_energy)
    residual = pair_of >= dr // 4  # the lower-frequency half of the kept pairs (rest_dims)
    parts = split_keys(wk, bk, op.wq.detach(), None if op.bq is None else op.bq.detach(), kmap, keep, pair_of, mixes,
                       residual)
    n = width(op, dr, "transmla")
    rank = n if kv_rank is None else kv_rank
    nk = parts["feats"].shape[0]
    m = torch.cat([parts["feats"], op.wv.detach().reshape(g * dv, -1)])
    up, down, err = _factor(m, nk, rank, stats)
    up_k, up_v = torch.einsum("gdn,nr->gdr", parts["place"], up[:nk]), up[nk:].reshape(g, dv, rank)
    b_uk = None if parts["b_feats"] is None else torch.einsum("gdn,n->gd", parts["place"], parts["b_feats"])[kmap]
    full = torch.equal(keep, torch.arange(op.head_dim))
    new = LatentAttention(
        w_q=parts["w_q"], b_q=parts["b_q"], w_dkv=down, w_kr=parts["w_kr"], b_kr=parts["b_kr"], w_uk=up_k[kmap],
        w_uv=up_v[kmap], b_uk=b_uk, b_uv=None if op.bv is None else op.bv.detach()[kmap], wo=op.wo, bo=op.bo,
        q_rope=op.q_transform if full else PartialRope(op.q_transform, keep.expand(op.q_heads, dr), op.head_dim),
        k_rope=op.k_transform if full else PartialRope(op.k_transform, keep[None], op.head_dim),
        rope_map=torch.zeros(op.q_heads, dtype=torch.long), scale=op.scale, causal=op.causal,
        info=copy.deepcopy(op.info), softcap=op.softcap)
    new.info.sources = {}
    return new, {"kv_rank": rank, "rope_dims": dr, "kv_width": n, "kv_values_before": g * (op.head_dim + dv),
                 "kv_values_after": rank + dr, "kv_residual_energy": err, "rope_pairs_kept": f"first {dr // 2}",
                 "rope_energy_shared": share}


@register
@dataclasses.dataclass(frozen=True)
class MLA(Pass):
    """MHA/GQA → multi-head latent attention (see the module docstring)."""

    name = "mla"
    kv_rank: Optional[int] = None  # None: full rank (exact)
    rope_dims: Optional[int] = None  # per head; None: every rotary dim (exact)
    method: str = "mha2mla"

    def __post_init__(self):
        self.check_options()

    @property
    def exact(self) -> bool:  # transmla is exact only on MQA sites (checked per site, not claimed)
        return self.kv_rank is None and self.rope_dims is None and self.method == "mha2mla"

    @property
    def needs_calibration(self) -> bool:  # the frequency selection and the whitened factorisation read statistics
        # (transmla's RoRoPE needs them only with several KV heads: run() asks per site)
        return self.kv_rank is not None or (bool(self.rope_dims) and self.method == "mha2mla")

    def check_options(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"mla{{method={self.method}}}: unknown method; valid: {', '.join(METHODS)}")
        if self.rope_dims is not None and (self.rope_dims < 0 or self.rope_dims % 2):
            raise SpecError(f"mla{{rope_dims={self.rope_dims}}}: rope_dims must be even and at least 0 (RoPE "
                            "rotates pairs of dims)")
        if self.kv_rank is not None and self.kv_rank < 1:
            raise SpecError(f"mla{{kv_rank={self.kv_rank}}}: kv_rank must be at least 1")

    def run(self, gm, ctx, spec: str = ""):
        spec = spec or self.spec()
        ops = sites(gm)
        lossy = [op for op in ops if not is_latent(op) and _lossy(op, self.rope_dims, self.kv_rank, self.method)]
        stats = [None] * len(ops)
        if lossy:
            if not ctx.calibration:
                raise PassError(f"{spec}: {_lossy(lossy[0], self.rope_dims, self.kv_rank, self.method)} needs calibration data "
                                "(pass calibration=[batches, ...]), or use the exact mla (method=mha2mla, no kv_rank, "
                                "no rope_dims)")
            stats = input_grams(gm, ctx.call(gm), ctx.calibration, track=ctx.track)

        def one(i, op):
            if is_latent(op):
                return None, {}, []
            why = _refusal(op, default_rope_dims(op) if self.rope_dims is None else self.rope_dims, self.kv_rank,
                           self.method)
            if why:
                return None, {}, [Diagnostic("skip", why, op.info.name)]
            new, st = convert_site(op, self.rope_dims, self.kv_rank, stats[i], self.method)
            return new, st, []

        result = rewrite_each_site(gm, one, latent=True)
        skips = [d for d in result.diagnostics if d.level == "skip"]
        if skips and len(skips) == len(ops):
            raise SpecError(f"{spec}: no site can take it: {skips[0].message}")
        return result


def _lossy(op, rope_dims: Optional[int], kv_rank: Optional[int], method: str = "mha2mla") -> Optional[str]:
    """Why this site's conversion reads calibration statistics (an approximation), or None."""
    dr = default_rope_dims(op) if rope_dims is None else rope_dims
    if method == "transmla" and op.info.rope is not None and dr and op.k_heads > 1:
        return (f"RoRoPE over {op.k_heads} KV heads (one shared RoPE key from the PCA of the keys; the rest of the "
                "keys lose their RoPE)")
    if method == "mha2mla" and op.info.rope is not None and 0 < dr < op.info.rotary_dims:
        return f"keeping rope_dims={dr} of the {op.info.rotary_dims} rotary dims (2-norm frequency selection)"
    if kv_rank is not None and kv_rank < width(op, dr, method):
        return f"kv_rank={kv_rank} below the K/V width {width(op, dr, method)} (whitened factorisation)"
    return None
