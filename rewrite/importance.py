"""Per-head importance scores, one ``[Hq]`` tensor per site, ℓ2-normalized within each layer.

- ``taylor`` (Michel, Levy, Neubig 2019): a mask ξ multiplies every head, MHAtt = Σ_h ξ_h·Att_h;
  I_h = Σ_x |∂L(x)/∂ξ_h| / tokens at ξ = 1. L is the model's own loss when the batch carries
  ``labels`` and the graph returns a loss. Without labels, a divergence to the unpruned output
  (KL for logits, MSE for hidden states) has zero gradient at ξ = 1, so we take the loss whose
  gradient second moment *is* that divergence's curvature (Fisher): L = −log p(y | x) with y drawn
  from the unpruned output, a class y ~ softmax(logits) per token, or y = out + ε, ε ~ N(0, I)
  for hidden states (L = ½‖out − y‖², the MSE's curvature). ξ is one scalar per example and head,
  so |·| is taken per example as in the paper's E_x|∂L/∂ξ_h|.
- ``taylor-local``: the same Fisher-Taylor score with the site's own output o = Σ_h ξ_h o_h (the attention
  layer's output, before the residual) in place of the model's: L = ½‖o − (o + ε)‖², ε ~ N(0, I), on the
  inputs the site receives. No gradient crosses a later layer, so it streams layer by layer
  (``rewrite.stream_calib``); each site draws its own ε sequence from ``seed``, so streamed and in-memory
  scores agree.
- ``magnitude``: ‖W_o^h‖_F · ‖W_v^{v_map[h]}‖_F (no calibration).
- ``entropy``: log n_keys − H(softmax row), averaged over query rows (peaked heads score high).
- ``random``: uniform scores from ``seed`` (baselines).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .calibrate import record_site_inputs
from .errors import PassError, SpecError
from .graph import sites, with_sites
from .heads import rebuild
from .score_mods import select_bias, softcap_scores

__all__ = ["METHODS", "NEEDS_CALIBRATION", "head_importance", "attention_probs", "row_entropy", "check_method",
           "site_inputs",
           "calibration_batches"]

METHODS = ("taylor", "taylor-local", "magnitude", "entropy", "random")
NEEDS_CALIBRATION = ("taylor", "taylor-local", "entropy")


def check_method(method: str, where: str) -> None:
    """SpecError for an unknown importance method."""
    if method not in METHODS:
        raise SpecError(f"{where}: unknown importance {method!r}; valid: {', '.join(METHODS)}")


def head_importance(gm, ctx, method: str = "taylor", seed: int = 0, normalize: bool = True,
                    probes: int = 4) -> list:
    """Per site, a ``[Hq]`` float tensor: larger = more important.

    Args:
        gm: a canonicalized graph module (never mutated).
        ctx: the PassContext (calibration batches, captured inputs, progress bar).
        method: "taylor" | "taylor-local" | "magnitude" | "entropy" | "random".
        seed: for ``random`` and for the sampled targets of ``taylor``.
        normalize: divide each layer's scores by their ℓ2 norm (Michel et al.), so layers compare.
        probes: sampled targets per batch for ``taylor`` without labels.
    """
    check_method(method, "head importance")
    if method in NEEDS_CALIBRATION and not (ctx is not None and ctx.calibration):
        raise PassError(f"importance={method} needs calibration data: pass calibration=[batches, ...] to "
                        "rewrite.convert (CLI: --calibration FILE), or use importance=magnitude")
    ops = sites(gm)
    if method == "magnitude":
        scores = [_magnitude(op) for op in ops]
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        scores = [torch.rand(op.q_heads, generator=g, dtype=torch.float64) for op in ops]
    elif method == "entropy":
        scores = _entropy_scores(gm, ctx)
    elif method == "taylor-local":
        scores = _taylor_local(gm, ctx, seed, probes)
    else:
        scores = _taylor(gm, ctx, seed, probes)
    scores = [s.detach().double() for s in scores]
    if normalize:
        scores = [s / s.norm().clamp_min(1e-30) for s in scores]
    return scores


# ---- magnitude ---------------------------------------------------------------------------------
def _magnitude(op) -> torch.Tensor:
    wo = op.wo.detach().double().norm(dim=(0, 2))  # (Do, Hq, dv) -> (Hq,)
    wv = op.wv.detach().double().flatten(1).norm(dim=1)  # (Hv, dv, D) -> (Hv,)
    return wo * wv[op.v_map]


# ---- attention probabilities and entropy ------------------------------------------------------
def attention_probs(op, args: tuple) -> torch.Tensor:
    """softmax(c·tanh(q kᵀ·scale / c) + M[:, bias_map]) of one site on the args it received: ``[B, Hq, Sq, Sk]``
    (the op's score modifiers, ``rewrite.score_mods``; with attention sinks a row sums to less than 1).

    Fully masked rows come back as zeros. A site with a custom ``score_fn`` still gets the softmax
    probabilities of its logits (what the original model computed).
    """
    x, kv, mask, *side = args
    with torch.no_grad():
        q, k, _ = op.project_qkv(x, kv, *side)
        k = op._expand(k, op.k_map, op._k_group)
        logits = softcap_scores((q @ k.transpose(-1, -2)).float() * op.scale, op.softcap)  # (B, Hq, Sq, Sk)
        mask = select_bias(mask, op.bias_map, op._bias_identity)
        if mask is not None:
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask
        elif op.causal:
            sq, sk = logits.shape[-2:]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        if op.sink_logits is not None:  # the sink's column joins the softmax and is dropped after it
            sink = op.sink_logits.detach().float().reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
            return torch.softmax(torch.cat([logits, sink], -1), dim=-1)[..., :-1].nan_to_num(0.0)
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def row_entropy(p: torch.Tensor) -> tuple:
    """Entropy (nats) of every attention row and log of its number of reachable keys, ``[B, H, Sq]``."""
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    reach = (p > 0).sum(-1).clamp_min(1).float().log()
    return ent, reach


def site_inputs(gm, ctx, description: str):
    """``(site index, op, args)`` of every site on every calibration batch, a batch at a time (the inputs the site
    received)."""
    ops = sites(gm)
    call = ctx.call(gm)
    for kw in ctx.track(calibration_batches(ctx), description):
        for i, recs in enumerate(record_site_inputs(gm, call, [kw])):
            yield i, ops[i], recs[0].args


def site_probs(gm, ctx, description: str):
    """``(site index, op, args, probabilities [B, Hq, Sq, Sk])``: ``site_inputs`` with ``attention_probs``."""
    for i, op, args in site_inputs(gm, ctx, description):
        yield i, op, args, attention_probs(op, args)


def _entropy_scores(gm, ctx) -> list:
    ops = sites(gm)
    total = [torch.zeros(op.q_heads, dtype=torch.float64) for op in ops]
    rows = [0] * len(ops)
    for i, _, _, p in site_probs(gm, ctx, "head importance (entropy)"):
        ent, reach = row_entropy(p)
        total[i] += (reach - ent).double().sum(dim=(0, 2))
        rows[i] += ent.shape[0] * ent.shape[2]
    return [t / max(n, 1) for t, n in zip(total, rows)]


# ---- taylor ------------------------------------------------------------------------------------
class HeadMask(nn.Module):
    """ξ ∈ R^{B×Hq}, created at ones on each call (a fresh leaf to differentiate against)."""

    def __init__(self, inner: Optional[nn.Module] = None):
        super().__init__()
        self.inner = inner
        self.xi = None
        self.tokens = 0

    def forward(self, op, x, q):
        b, h, s, _ = q.shape  # (B, Hq, Sq, dh)
        self.xi = torch.ones(b, h, dtype=q.dtype, device=q.device, requires_grad=True)
        self.tokens = b * s
        gate = self.xi[:, :, None].expand(b, h, s)  # (B, Hq, Sq)
        return gate * self.inner(op, x, q) if self.inner is not None else gate


def calibration_batches(ctx) -> list:
    """Calibration batches restricted to the inputs the graph was captured with."""
    names = set(ctx.captured.kwargs) if ctx.captured is not None else None
    return [{k: v for k, v in b.items() if names is None or k in names} for b in ctx.calibration]


def _primary(out, width: int):
    """(tensor, kind) of the output to score against: logits -> "categorical", else "gaussian"."""
    if isinstance(out, torch.Tensor):
        return out, ("gaussian" if out.shape[-1] == width else "categorical")
    if hasattr(out, "keys"):
        for key, kind in (("logits", "categorical"), ("last_hidden_state", "gaussian")):
            if key in out.keys() and isinstance(out[key], torch.Tensor):
                return out[key], kind
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise PassError("taylor importance: the model returns no floating-point tensor to score heads against")
    t = leaves[0]
    return t, ("gaussian" if t.shape[-1] == width else "categorical")


def _loss_of(out):
    loss = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def _taylor(gm, ctx, seed: int, probes: int) -> list:
    ops = sites(gm)
    masks = [HeadMask(op.head_gate) for op in ops]
    gated = {}
    for i, (op, m) in enumerate(zip(ops, masks)):
        new = rebuild(op)
        new.head_gate = m
        gated[i] = new
    probe_gm = with_sites(gm, gated)
    run = ctx.call(probe_gm)
    width = ops[0].wo.shape[0]
    g = torch.Generator().manual_seed(seed)
    total = [torch.zeros(op.q_heads, dtype=torch.float64) for op in ops]
    tokens = 0
    for kw in ctx.track(calibration_batches(ctx), "head importance (taylor)"):
        with torch.enable_grad():
            out = run(kw)
            xis = [m.xi for m in masks]
            if any(x is None for x in xis):
                raise PassError("taylor importance: a site did not run on a calibration batch")
            tokens += masks[0].tokens
            losses = _losses(out, kw, width, g, probes)
            for j, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, xis, retain_graph=j + 1 < len(losses), allow_unused=True)
                for t, gr in zip(total, grads):
                    if gr is not None:
                        t += gr.detach().abs().double().sum(0) / len(losses)
        for m in masks:
            m.xi = None
    return [t / max(tokens, 1) for t in total]


def _taylor_local(gm, ctx, seed: int, probes: int) -> list:
    """E_x|∂L/∂ξ_h| / tokens per site, L the Gaussian probe loss on the site's own output (module docstring)."""
    ops = sites(gm)
    gens = [torch.Generator().manual_seed(seed) for _ in ops]  # one ε sequence per site, as a streamed sweep draws
    total = [torch.zeros(op.q_heads, dtype=torch.float64) for op in ops]
    tokens = [0] * len(ops)
    for i, op, args in site_inputs(gm, ctx, "head importance (taylor-local)"):
        probe, mask = rebuild(op), HeadMask(op.head_gate)
        probe.head_gate = mask
        with torch.enable_grad():
            losses = _losses(probe(*args), {}, op.wo.shape[0], gens[i], probes)
            for j, loss in enumerate(losses):
                (gr,) = torch.autograd.grad(loss, mask.xi, retain_graph=j + 1 < len(losses))
                total[i] += gr.detach().abs().double().sum(0) / len(losses)
        tokens[i] += mask.tokens
    return [t / max(n, 1) for t, n in zip(total, tokens)]


def _losses(out, kw, width: int, g: torch.Generator, probes: int) -> list:
    """The losses to differentiate: the model's own, else ``probes`` sampled-target likelihoods."""
    if "labels" in kw and _loss_of(out) is not None:
        return [_loss_of(out)]
    y, kind = _primary(out, width)
    ref = y.detach().float()
    losses = []
    for _ in range(probes):
        if kind == "categorical":
            flat = torch.softmax(ref.reshape(-1, ref.shape[-1]), -1)
            target = torch.multinomial(flat, 1, generator=g).flatten()
            losses.append(torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]).float(), target,
                                                            reduction="sum"))
        else:
            noise = torch.randn(ref.shape, generator=g, dtype=ref.dtype)
            losses.append(0.5 * ((y.float() - (ref + noise)) ** 2).sum())
    return losses
