"""Head surgery on the canonical op: every function returns a new ``Attention``; the input is untouched.

- ``rebuild(op, **fields)``: a copy with some weights/maps replaced (transforms, gates, info kept);
- ``query_fields(op, index)``: the per-query-head fields (W_q rows, b_q, W_o columns, the score-bias rows
  ``bias_map``, the sink logits, the spans ``window``/``sinks``) of the query heads ``index``, for passes that
  slice or permute query heads;
- ``select_query_heads(op, keep)``: W_q rows and W_o columns of the kept query heads;
  KV heads that no kept query head reads are dropped too; a head gate with ``select`` follows;
- ``pool_kv(op, groups, weights=None)``: W̃_k^g = Σ_{j∈S_g} ω_j W_k^j (mean when no weights), same for V;
- ``duplicate_kv(op, kv_heads)``: give every group of query heads its own copy of its KV head (exact).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from .ir import Attention

__all__ = ["FixedHeads", "refuse_fixed_heads", "rebuild", "query_fields", "select_query_heads", "pool_kv", "duplicate_kv", "contiguous_map"]


class FixedHeads(ValueError):
    """A change of heads the site cannot take exactly; passes skip the site with this reason."""


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                         and torch.equal(a.detach(), b.detach()))


def refuse_fixed_heads(op: Attention, fields: dict) -> None:
    """Raise ``FixedHeads`` when ``fields`` change the query (or key) projection under a q/k transform over the
    whole projection (a norm over all H·d features before the head split, OLMo-2): its denominator and
    per-feature gains belong to those very heads, so removing, merging, adding, reordering or re-mixing them
    is not exact."""
    for side, t, w, b in (("query", op.q_transform, "wq", "bq"), ("key", op.k_transform, "wk", "bk"),
                          ("value", op.v_transform, "wv", "bv")):
        if t is None or t.heads is None:
            continue
        if not (_same(fields.get(w, getattr(op, w)), getattr(op, w)) and _same(fields.get(b, getattr(op, b)),
                                                                                getattr(op, b))):
            if "per-head constants" in t.description:
                raise FixedHeads(f"{op.info.name}: its {side} transform ({t.description}) holds one entry per "
                                 f"head for {t.heads} heads; changing its {side} heads would leave them without "
                                 "their constants, so this pass cannot be exact here")
            raise FixedHeads(f"{op.info.name}: its {side} norm acts on the whole projection of {t.heads} heads "
                             f"before the head split ({t.description}); changing its {side} heads would change "
                             "the norm's denominator and gains, so this pass cannot be exact here")


def rebuild(op: Attention, head_gate=None, **fields) -> Attention:
    """A new op with ``fields`` (wq, bq, wk, bk, wv, bv, wo, bo, k_map, v_map, bias_map, sink_logits) replaced (and
    ``head_gate``); the soft-cap and the mask's head count ``bias_heads`` are kept.

    Raises ``FixedHeads`` when the query or key projection changes under a whole-projection transform.
    """
    names = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "k_map", "v_map", "bias_map", "sink_logits", "window",
             "sinks")
    cur = {n: getattr(op, n) for n in names}
    cur.update(fields)
    refuse_fixed_heads(op, fields)
    for field, what in (("bias_map", "score bias has one row"), ("sink_logits", "attention sinks hold one logit"),
                        ("window", "attention spans (local-heads) hold one window and sink count")):
        if (cur[field] is not None and field not in fields and "wq" in fields
                and cur["wq"].shape[0] != op.q_heads):
            raise ValueError(f"{op.info.name}: its {what} per query head and this change of query heads does not "
                             f"say which the new heads read (pass {field}, see heads.query_fields)")
    head_gate = op.head_gate if head_gate is None else head_gate
    if head_gate is not None and head_gate is op.head_gate and cur["wq"].shape[0] != op.q_heads:
        raise ValueError(f"{op.info.name}: its head gate ({type(op.head_gate).__name__}) is sized for "
                         f"{op.q_heads} query heads and cannot follow this change of heads; run head-count "
                         "passes before moh")
    new = Attention(**{n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in cur.items()},
                    scale=op.scale, causal=op.causal, info=copy.deepcopy(op.info),
                    q_transform=op.q_transform, k_transform=op.k_transform, v_transform=op.v_transform,
                    bias_heads=op.bias_heads, softcap=op.softcap)
    new.score_fn = op.score_fn
    new.head_gate = head_gate
    return new


def query_fields(op: Attention, index: torch.Tensor) -> dict:
    """``rebuild`` fields of the query heads ``index`` (in that order): W_q rows, b_q, W_o columns, bias rows,
    spans."""
    index = torch.as_tensor(index, dtype=torch.long)
    per_head = {n: None if getattr(op, n) is None else getattr(op, n)[index.to(getattr(op, n).device)]
                for n in ("bias_map", "sink_logits", "window", "sinks")}
    return {"wq": op.wq[index], "bq": None if op.bq is None else op.bq[index], "wo": op.wo[:, index], **per_head}


def contiguous_map(q_heads: int, kv_heads: int) -> torch.Tensor:
    """HF repeat_kv order: query head i reads KV head i // (q_heads / kv_heads)."""
    return torch.arange(q_heads) // (q_heads // kv_heads)


def _compact(w: torch.Tensor, b: Optional[torch.Tensor], kv_map: torch.Tensor):
    """Drop KV heads no query head reads; renumber the map."""
    used = sorted(set(kv_map.tolist()))
    index = torch.tensor(used)
    renum = torch.full((w.shape[0],), -1, dtype=torch.long)
    renum[index] = torch.arange(len(used))
    return w[index], (b[index] if b is not None else None), renum[kv_map]


def select_query_heads(op: Attention, keep: Sequence[int]) -> Attention:
    """Keep only the query heads ``keep`` (original numbering): q rows and o columns sliced."""
    keep_t = torch.tensor(sorted(keep), dtype=torch.long)
    if keep_t.numel() == 0:
        raise ValueError(f"{op.info.name}: cannot remove every query head")
    wk, bk, k_map = _compact(op.wk, op.bk, op.k_map[keep_t])
    wv, bv, v_map = _compact(op.wv, op.bv, op.v_map[keep_t])
    gate = op.head_gate.select(keep_t) if hasattr(op.head_gate, "select") else None  # a gate that can follow
    return rebuild(op, head_gate=gate, **query_fields(op, keep_t), wk=wk, bk=bk, wv=wv, bv=bv, k_map=k_map,
                   v_map=v_map)


def _pool(w, b, groups, weights):
    ws, bs = [], []
    for g, members in enumerate(groups):
        idx = torch.tensor(members)
        om = (torch.full((len(members),), 1.0 / len(members), dtype=w.dtype) if weights is None
              else torch.as_tensor(weights[g], dtype=w.dtype))
        ws.append(torch.einsum("j,jdk->dk", om, w[idx]))
        if b is not None:
            bs.append(torch.einsum("j,jd->d", om, b[idx]))
    return torch.stack(ws), (torch.stack(bs) if b is not None else None)


def pool_kv(op: Attention, k_groups: Sequence[Sequence[int]], v_groups: Optional[Sequence[Sequence[int]]] = None,
            k_weights=None, v_weights=None) -> Attention:
    """Merge KV heads: group g of the new heads is Σ ω_j · head_j over ``groups[g]`` (mean by default).

    Every query head then reads the new head whose group holds its old KV head.
    """
    v_groups = k_groups if v_groups is None else v_groups

    def new_map(old_map, groups):
        owner = {}
        for g, members in enumerate(groups):
            for j in members:
                owner[j] = g
        missing = sorted(set(old_map.tolist()) - set(owner))
        if missing:
            raise ValueError(f"{op.info.name}: KV heads {missing} are in no group")
        return torch.tensor([owner[j] for j in old_map.tolist()])

    wk, bk = _pool(op.wk, op.bk, k_groups, k_weights)
    wv, bv = _pool(op.wv, op.bv, v_groups, v_weights)
    return rebuild(op, wk=wk, bk=bk, wv=wv, bv=bv, k_map=new_map(op.k_map, k_groups),
                   v_map=new_map(op.v_map, v_groups))


def duplicate_kv(op: Attention, kv_heads: int) -> Attention:
    """Exact: split each KV group so that ``kv_heads`` contiguous groups each own a copy of their head."""
    hq = op.q_heads
    if hq % kv_heads:
        raise ValueError(f"{op.info.name}: {hq} query heads are not divisible by kv_heads={kv_heads}")
    new_map = contiguous_map(hq, kv_heads)
    # new head g serves query heads with new_map == g; all of them must read one old head
    k_src, v_src = [], []
    for g in range(kv_heads):
        members = (new_map == g).nonzero().flatten()
        ks, vs = set(op.k_map[members].tolist()), set(op.v_map[members].tolist())
        if len(ks) != 1 or len(vs) != 1:
            raise ValueError(f"{op.info.name}: query heads {members.tolist()} read different KV heads; "
                             f"kv_heads={kv_heads} would merge them")
        k_src.append(ks.pop())
        v_src.append(vs.pop())
    k_src, v_src = torch.tensor(k_src), torch.tensor(v_src)
    return rebuild(op, wk=op.wk[k_src], bk=op.bk[k_src] if op.bk is not None else None,
                   wv=op.wv[v_src], bv=op.bv[v_src] if op.bv is not None else None, k_map=new_map, v_map=new_map)
