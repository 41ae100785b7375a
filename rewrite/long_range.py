"""How much each query head needs keys beyond a recent window: per site, an ``[Hq]`` score (higher = keep full).

- ``distance``: the attention mass outside the span (window w, sinks s) on calibration text,
  D_h = mean over query rows with keys outside the span of Σ_{j ∉ span(i)} p_h(i, j).
- ``retrieval`` (Wu et al. 2024, METHODS.md card 10): copy score on passkey batches, the fraction of
  copy steps at which the head's top key is the earlier token being copied, R_h = mean_t [argmax_j p_h(b+t, j) = a+t+1].
- ``duo`` (DuoAttention): a gate α_h ∈ [0, 1] per head (one per KV group) mixing full and streaming attention,
  o_h = α_h·full_h + (1 − α_h)·stream_h, fitted on passkey batches to L = ‖y − y_full‖² / Var(y_full) + λ·mean(α);
  the score is α.

Passkey batches (``passkey_batches``): each calibration row copies an early segment of its own tokens
(m tokens at a, just after the sinks) over its last m real tokens (at b), with b − a − m ≥ w, so retrieving it
needs a key beyond every streaming head's window.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibrate import record_site_inputs
from .errors import PassError
from .graph import sites, with_sites
from .importance import attention_probs, calibration_batches, site_probs
from .ir import causal_keep, hidden
from .score_mods import softcapped_attention
from .spans import masked_span, real_key_rows, span_keep

__all__ = ["passkey_batches", "distance_scores", "retrieval_scores", "duo_scores", "DuoMix"]


def _per_head(op, value: int) -> torch.Tensor:
    return torch.full((op.q_heads,), int(value), dtype=torch.long)


def passkey_batches(ctx, window: int, sinks: int, seg: int = 16, seed: int = 0) -> tuple:
    """(batches with an inserted copy, per batch a list of (row, a, b, m)): see the module docstring."""
    batches, where = [], []
    g = torch.Generator().manual_seed(seed)
    for kw in calibration_batches(ctx):
        if "input_ids" not in kw:
            raise PassError("local-heads: score=retrieval/duo builds passkey text from token ids; the calibration "
                            "batches have no input_ids (use score=distance)")
        ids = kw["input_ids"].clone()
        real = kw.get("attention_mask", torch.ones_like(ids)).bool()
        spots = []
        for r in range(ids.shape[0]):
            pos = real[r].nonzero().flatten()
            m = min(seg, max(0, (len(pos) - window - sinks - 2) // 2))
            if m < 2:
                continue
            a = int(pos[0]) + sinks + 1 + int(torch.randint(0, max(1, len(pos) - window - sinks - 2 * m - 1), (1,),
                                                             generator=g))
            b = int(pos[-1]) - m + 1
            if b - (a + m) < window:
                continue
            ids[r, b:b + m] = ids[r, a:a + m]
            spots.append((r, a, b, m))
        if spots:
            batches.append({**kw, "input_ids": ids})
            where.append(spots)
    if not batches:
        raise PassError(f"local-heads: no calibration row is long enough for a long-range copy past window={window} "
                        f"(it needs more than window + sinks + 6 = {window + sinks + 6} real tokens); give longer "
                        "calibration text or a smaller window")
    return batches, where


def _visible(op, mask, q_len: int, k_len: int) -> torch.Tensor:
    """``[B|1, H|1, Sq, Sk]`` bool: what the site's own mask (or causal rule) lets each query see."""
    if mask is None:
        keep = causal_keep(q_len, k_len) if op.causal else torch.ones(q_len, k_len, dtype=torch.bool)
        return keep[None, None]
    keep = ~hidden(mask)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    return keep


def distance_scores(gm, ctx, window: int, sinks: int) -> list:
    """Per site ``[Hq]``: mean attention mass outside the span, over query rows that have keys outside it."""
    ops = sites(gm)
    mass = [torch.zeros(op.q_heads, dtype=torch.float64) for op in ops]
    rows = [0] * len(ops)
    for i, op, args, p in site_probs(gm, ctx, "long-range score (distance)"):  # p [B, Hq, Sq, Sk]
        sq, sk = p.shape[-2:]
        mask = args[2] if len(args) > 2 else None
        span = span_keep(_per_head(op, window), _per_head(op, sinks), sq, sk, real_key_rows(mask, sk))
        outside = _visible(op, mask, sq, sk) & ~span  # [B, Hq, Sq, Sk]
        has = outside.any(-1).expand(p.shape[:3])
        beyond = (p * outside).sum(-1)  # [B, Hq, Sq]
        mass[i] += (beyond * has).double().sum(dim=(0, 2))
        rows[i] += int(has[:, 0].sum())
    if not any(rows):
        raise PassError(f"local-heads: no calibration query has a key beyond window={window}; give calibration "
                        "text longer than the window")
    return [m / max(n, 1) for m, n in zip(mass, rows)]


def retrieval_scores(gm, ctx, window: int, sinks: int, seed: int = 0) -> list:
    """Per site ``[Hq]``: the copy score on passkey batches."""
    ops = sites(gm)
    hits = [torch.zeros(op.q_heads, dtype=torch.float64) for op in ops]
    steps = 0
    call = ctx.call(gm)
    batches, where = passkey_batches(ctx, window, sinks, seed=seed)
    for kw, spots in zip(ctx.track(batches, "long-range score (retrieval)"), where):
        recs = record_site_inputs(gm, call, [kw])
        for i, op in enumerate(ops):
            top = attention_probs(op, recs[i][0].args).argmax(-1)  # [B, Hq, Sq]
            for r, a, b, m in spots:
                t = torch.arange(m - 1)
                hits[i] += (top[r][:, b + t] == (a + t + 1)).double().sum(-1)
        steps += sum(m - 1 for _, _, _, m in spots)
    return [h / max(steps, 1) for h in hits]


class DuoMix(nn.Module):
    """Score function o_h = α_h·full_h + (1 − α_h)·stream_h, α = clamp(gate[group], 0, 1) (calibration only)."""

    def __init__(self, gate: nn.Parameter, group: torch.Tensor, window: int, sinks: int):
        super().__init__()
        self.gate, self.window, self.sinks = gate, window, sinks
        self.register_buffer("group", group)

    def forward(self, op, q, k, v, mask):
        k = op._expand(k, op.k_map, op._k_group)
        v = op._expand(v, op.v_map, op._v_group)
        causal = op.causal and mask is None
        sq, sk = q.shape[2], k.shape[2]
        full = softcapped_attention(q, k, v, mask, op.scale, op.softcap, causal)
        smask = masked_span(_per_head(op, self.window), _per_head(op, self.sinks), mask, causal, sq, sk, q.device)
        stream = softcapped_attention(q, k, v, smask, op.scale, op.softcap, False)
        alpha = self.gate.clamp(0, 1)[self.group][None, :, None, None].to(q.dtype)
        return alpha * full + (1 - alpha) * stream


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if hasattr(out, "keys") and "logits" in out.keys() else out[0]


def duo_scores(gm, ctx, window: int, sinks: int, groups: list, steps: int = 40, l1: float = 0.05,
               lr: float = 0.05, seed: int = 0) -> list:
    """Per site ``[Hq]``: the fitted gate α (``groups[i]``: the KV group of each query head, ``[Hq]`` long)."""
    ops = sites(gm)
    for op in ops:
        if op.score_fn is not None:
            raise PassError(f"local-heads: score=duo mixes softmax attention, and {op.info.name} has a score "
                            f"function ({type(op.score_fn).__name__}); run local-heads before it or use "
                            "score=distance")
    from .scores import attach

    gates = [nn.Parameter(torch.ones(int(g.max()) + 1)) for g in groups]
    probe = with_sites(gm, {i: attach(op, score_fn=DuoMix(gates[i], groups[i], window, sinks))
                            for i, op in enumerate(ops)})
    batches, where = passkey_batches(ctx, window, sinks, seed=seed)
    ref_run, run = ctx.call(gm), ctx.call(probe)
    with torch.no_grad():
        refs = [_logits(ref_run(kw)).detach() for kw in batches]
    weights = []
    for kw, spots, ref in zip(batches, where, refs):
        w = torch.zeros(ref.shape[:2])
        real = kw.get("attention_mask", torch.ones(ref.shape[:2])).bool()
        w[:, window:] = 1.0
        for r, _, b, m in spots:
            w[r, b - 1:b + m - 1] += 4.0  # the positions that predict the copied tokens
        weights.append(w * real)
    opt = torch.optim.Adam(gates, lr=lr)
    for step in ctx.track(range(steps), "long-range score (duo)"):
        j = step % len(batches)
        with torch.enable_grad():
            y = _logits(run(batches[j])).float()
            err = ((y - refs[j]) ** 2).mean(-1) / refs[j].var().clamp_min(1e-12)
            loss = (err * weights[j]).sum() / weights[j].sum() + l1 * torch.cat(gates).clamp(0, 1).mean()
            grads = torch.autograd.grad(loss, gates)
        for g, gr in zip(gates, grads):
            g.grad = gr
        opt.step()
        with torch.no_grad():
            for g in gates:
                g.clamp_(0, 1)
    return [g.detach().double()[grp] for g, grp in zip(gates, groups)]
