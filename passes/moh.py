"""moh: Mixture-of-Head attention (Jin et al., ICML 2025) — every token uses only some heads.

    out(t) = Σ_i g_i(t) · W_o^i · head_i(t) + b_o,   g_i(t) ≠ 0 only for the h_s shared heads and the
    top-K routed heads of token t

with h_s = ⌊shared_ratio·H + ½⌋ shared heads and K = ⌊active_ratio·H + ½⌋ − h_s of the
E = H − h_s routed heads active per token. All attention weights are copied; the router is new.
Without ``shared_ratio`` it is derived: min(½, ⅔·active_ratio) (MoH-LLaMA3's ½ from active_ratio ≥ 0.75
on), and h_s is then lowered where rounding would leave no routed head active.

Which heads are shared (``shared``): the h_s most important by ``rewrite.importance`` (``taylor``, ``entropy``,
``magnitude``; the query heads are reordered so they come first, exactly, with W_o and the KV maps), or the
first h_s (``first``). ``auto`` (default): taylor with calibration data, else first. On the reference decoder
at 75% active with the qnorm router, taylor-chosen shared heads give +0.06 bpb training-free against +0.16
for the first heads.

Routers (``router``):
- ``learned`` (MoH-ViT/DiT): W_s [h_s, D], W_r [E, D], W_h [2, D], no bias, zero-initialised, with
  the official rescalings: shared = softmax(W_s x)·h_s, routed = top-K of softmax(W_r x) renormalised
  ×K, head-type weights = softmax(W_h x)·2. At ``active_ratio=1`` every gate is exactly 1 (exact).
  Below 1 the zero router ties, so top-K keeps the same K routed heads for every token until trained.
  W_s is omitted when h_s ≤ 1 (its softmax is the constant 1), W_h when h_s = 0.
- ``qnorm`` (MoH-LLaMA3 conversion): no parameters; routed logit ‖q_i(t)‖ of the pre-RoPE query
  (q_proj output with its bias), divided by its std over the routed heads, softmax, top-K; the gate is
  a binary mask. Exact at ``active_ratio=1``.
Training: ``load_balance_loss(conv)`` sums l_aux = E·Σ_i P̄_i f̄_i over the sites from their last call
(β = 0.01 in the paper). With calibration data the stats give, per site, the measured fraction of
active heads and each head's activation frequency.

Cases handled:
1. every site, either layout (``BSD``/seq-first ``SBD``), self- and cross-attention (the router reads the
   query-side input), any score function, shared weights (MASA) kept shared;
2. GQA/DHA: gates act on query heads; the KV heads and the KV cache are unchanged.
Refused:
1. active_ratio outside (0, 1], a given shared_ratio outside [0, 1) or ≥ active_ratio, an unknown
   router (SpecError);
2. per site, skipped with a diagnostic: a head gate already present; a head count that leaves no routed
   head active after rounding.
Pitfalls: heads are masked, not skipped (compute falls only with gather/varlen kernels); padding tokens
count in the load-balance statistics; in decode the gate applies to the new token only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from rewrite.errors import SpecError
from rewrite.graph import sites
from rewrite.pass_base import Diagnostic, SitePass, register
from rewrite.scores import MoHGate, attach

__all__ = ["MoH", "load_balance_loss"]

ROUTERS = ("learned", "qnorm")
SHARED = ("auto", "first", "taylor", "entropy", "magnitude")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_shared_ratio(active_ratio: float) -> float:
    """The shared share when none is given: MoH-LLaMA3's ½, or ⅔ of ``active_ratio`` when that is smaller."""
    return min(0.5, active_ratio * 2.0 / 3.0)


def head_split(heads: int, active_ratio: float, shared_ratio: Optional[float] = None) -> tuple:
    """(shared heads h_s, routed heads active K) for a site with ``heads`` query heads.

    With ``shared_ratio=None`` the derived share never leaves K = 0 when at least one head is active.
    """
    active = min(heads, _round(active_ratio * heads))
    if shared_ratio is None:
        shared = max(0, min(_round(default_shared_ratio(active_ratio) * heads), active - 1))
    else:
        shared = _round(shared_ratio * heads)
    return shared, active - shared


@register
@dataclasses.dataclass(frozen=True)
class MoH(SitePass):
    """Turn every site into a Mixture-of-Head site."""

    name = "moh"
    active_ratio: float = 0.75  # fraction of heads active per token (MoH-LLaMA3: 0.75)
    shared_ratio: Optional[float] = None  # fraction of heads always on; None: min(0.5, active_ratio·2/3)
    router: str = "learned"  # learned | qnorm
    shared: str = "auto"  # which heads are shared: auto | first | taylor | entropy | magnitude

    def __post_init__(self):
        self.check_options()  # bad options fail when the spec is parsed, before any capture

    @property
    def exact(self) -> bool:
        return self.active_ratio == 1.0

    def check_options(self) -> None:
        if not 0.0 < self.active_ratio <= 1.0:
            raise SpecError(f"moh{{active_ratio}}: must lie in (0, 1], got {self.active_ratio}")
        if self.shared_ratio is None:
            pass
        elif not 0.0 <= self.shared_ratio < 1.0:
            raise SpecError(f"moh{{shared_ratio}}: must lie in [0, 1), got {self.shared_ratio}")
        elif self.shared_ratio >= self.active_ratio:
            raise SpecError(f"moh: shared_ratio={self.shared_ratio} must be below active_ratio="
                            f"{self.active_ratio}, or no routed head is ever active")
        if self.router not in ROUTERS:
            raise SpecError(f"moh{{router}}: expected one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.shared not in SHARED:
            raise SpecError(f"moh{{shared}}: expected one of {', '.join(SHARED)}, got {self.shared!r}")

    def rewrite_site(self, index, op, ctx):
        name = op.info.name
        if op.head_gate is not None:
            return None, {}, [Diagnostic("skip", f"already has a head gate ({type(op.head_gate).__name__})", name)]
        heads, dim = op.q_heads, op.wq.shape[2]
        shared, top_k = head_split(heads, self.active_ratio, self.shared_ratio)
        if top_k < 1:
            return None, {}, [Diagnostic(
                "skip", f"{heads} heads: {shared} shared heads leave no routed head active at "
                        f"active_ratio={self.active_ratio}; lower shared_ratio", name)]
        gate = MoHGate(heads, dim, shared, top_k, self.router).to(dtype=op.wq.dtype, device=op.wq.device)
        new = attach(op, head_gate=gate)
        stats = {"shared_heads": shared, "routed_heads": heads - shared, "top_k": top_k,
                 "active_heads": shared + top_k, "router_params": sum(p.numel() for p in gate.parameters())}
        return new, stats, []

    def run(self, gm, ctx):
        self.check_options()
        method = self.shared if self.shared != "auto" else ("taylor" if ctx.calibration else "first")
        order = {}
        if method != "first":  # the most important heads first: they become the shared ones
            gm, order = _important_first(gm, ctx, method)
        result = super().run(gm, ctx)
        for i, op in enumerate(sites(result.graph)):
            if i in order:
                result.stats.setdefault(op.info.name, {}).update(
                    shared_by=method, shared_head_ids=order[i][:result.stats[op.info.name].get("shared_heads", 0)])
        if ctx.calibration:
            measured = _measure(result.graph, ctx)
            for site, numbers in measured.items():
                result.stats.setdefault(site, {}).update(numbers)
        return result


def _important_first(gm, ctx, method: str):
    """``gm`` with every site's query heads in decreasing importance (exact: W_q rows, W_o columns and the KV maps
    move together), and the original head of each new position per site. Sites with per-head state in a score
    function, or a gate already, keep their order."""
    from rewrite.graph import with_sites
    from rewrite.heads import query_fields, rebuild
    from rewrite.importance import head_importance

    replace, order = {}, {}
    for i, (op, score) in enumerate(zip(sites(gm), head_importance(gm, ctx, method))):
        stateful = op.head_gate is not None or (op.score_fn is not None and any(True for _ in op.score_fn.parameters()))
        if stateful:
            continue
        perm = torch.argsort(score, descending=True, stable=True)
        replace[i] = rebuild(op, **query_fields(op, perm), k_map=op.k_map[perm], v_map=op.v_map[perm])
        order[i] = perm.tolist()
    return with_sites(gm, replace), order


def _measure(gm, ctx) -> dict:
    """Per site: fraction of (token, head) pairs with a non-zero gate, per-head frequency, mean l_aux."""
    counts, tokens, aux, hooks = {}, {}, {}, []
    ops = [op for op in sites(gm) if isinstance(op.head_gate, MoHGate)]

    def hook(module, args, g, key):
        active = (g != 0).to(torch.float64)  # (B, Hq, S)
        counts[key] = counts.get(key, 0) + active.sum(dim=(0, 2))
        tokens[key] = tokens.get(key, 0) + g.shape[0] * g.shape[2]
        aux.setdefault(key, []).append(float(module.load_balance_loss()))

    for op in ops:
        hooks.append(op.head_gate.register_forward_hook(lambda m, a, g, key=op.info.name: hook(m, a, g, key)))
    try:
        run = ctx.call(gm)
        with torch.no_grad():
            for batch in ctx.track(ctx.calibration, "moh: measuring active heads"):
                run(batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, c in counts.items():
        freq = (c / tokens[key]).tolist()
        out[key] = {"active_fraction": round(sum(freq) / len(freq), 4),
                    "head_frequency": [round(f, 4) for f in freq],
                    "load_balance_loss": round(sum(aux[key]) / len(aux[key]), 4)}
    return out


def load_balance_loss(model) -> torch.Tensor:
    """Σ over MoH sites of l_aux from their last forward call (``model``: a Converted or a GraphModule).

    Add β·load_balance_loss(conv) (β = 0.01) to the task loss when training the routers.
    """
    gm = getattr(model, "gm", model)
    losses = [op.head_gate.load_balance_loss() for op in sites(gm) if isinstance(op.head_gate, MoHGate)]
    return torch.stack(losses).sum() if losses else torch.zeros(())
