"""Score functions and head gates shared by passes (plugged into ``Attention.score_fn`` / ``head_gate``).

Score functions replace ``softmax(q kᵀ·scale + mask) v`` and are called as ``score_fn(op, q, k, v, mask)``:

- ``ClippedSoftmax(zeta, gamma)``: clip((ζ−γ)·softmax(s) + γ, 0, 1) v (Bondarenko et al. 2023).

Head gates give per-head, per-token weights ``g [B, Hq, Sq]`` multiplied onto each head's output before
the output projection; they are called as ``head_gate(op, x, q)``:

- ``SigmoidHeadGate``: g_i = sigmoid(G_i(x)) / π_init, G_i a Linear on head i's slice of x (or on all of x);
  ``select(keep)`` gives the gate of a subset of heads (pruning after gating stays exact);
- ``MoHGate``: Mixture-of-Head router, learned (shared + routed softmax, top-K) or parameter-free ‖q_i‖.

Helpers: ``attach`` (a new op with a score function / gate set, sharing the old op's weights or weight
provider), ``masked_scores`` (logits with the op's mask / causal rule and the keep pattern),
``heads_first`` (token-major ``(B,S,H)`` / ``(S,B,H)`` → ``(B,H,S)``).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ir import causal_keep
from .score_mods import softcap_scores

__all__ = ["attach", "masked_scores", "heads_first", "ClippedSoftmax", "SigmoidHeadGate", "MoHGate"]


def attach(op, **parts):
    """A new op equal to ``op`` but with ``parts`` (``score_fn=``, ``head_gate=``) set; ``op`` is untouched.

    Unlike ``heads.rebuild`` it shares the weights as they are, so a weight provider (MASA's shared
    atoms) stays shared instead of being expanded into per-layer Parameters.
    """
    new = copy.copy(op)
    for key, value in list(new.__dict__.items()):  # own registries (parameters, modules, hooks, ...)
        if isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
    new.info = copy.deepcopy(op.info)
    for name, module in parts.items():
        setattr(new, name, module)
    return new


def masked_scores(op, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]):
    """Logits ``c·tanh(q kᵀ·scale / c)`` (``c = op.softcap``; plain ``q kᵀ·scale`` for 0) with the op's mask
    applied as SDPA would, and the keep pattern (or None).

    ``mask`` is SDPA's attn_mask: bool (True = keep) or additive float; ``op.causal`` applies only when
    there is no mask (as in ``Attention.core``), bottom-right aligned (the queries are the last Sq keys).
    Returns ``(s [B,Hq,Sq,Sk], keep | None)``; keep is False exactly where the weight must be zero.
    """
    k = op._expand(k, op.k_map, op._k_group)  # (B, Hq, Sk, dh)
    s = softcap_scores(torch.matmul(q, k.transpose(-2, -1)) * op.scale, op.softcap)  # (B, Hq, Sq, Sk)
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
            s = s.masked_fill(~keep, float("-inf"))
        else:
            s = s + mask
            keep = mask != float("-inf")
    elif op.causal:
        sq, sk = s.shape[-2], s.shape[-1]
        keep = causal_keep(sq, sk, s.device)
        s = s.masked_fill(~keep, float("-inf"))
    return s, keep


def heads_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, S, H) or (S, B, H) → (B, H, S)."""
    return t.permute(1, 2, 0) if layout == "SBD" else t.transpose(1, 2)


class ClippedSoftmax(nn.Module):
    """clip((ζ−γ)·softmax(s) + γ, 0, 1) · v; masked positions are exactly zero. Identity at ζ=1, γ=0."""

    def __init__(self, zeta: float = 1.0, gamma: float = 0.0):
        super().__init__()
        self.zeta, self.gamma = float(zeta), float(gamma)

    def forward(self, op, q, k, v, mask=None):
        s, keep = masked_scores(op, q, k, mask)
        p = torch.softmax(s, dim=-1)
        if keep is not None:  # also rows with nothing to attend to (softmax gives NaN there)
            p = p.masked_fill(~keep, 0.0)
        if self.zeta != 1.0 or self.gamma != 0.0:
            p = torch.clamp((self.zeta - self.gamma) * p + self.gamma, 0.0, 1.0)
        v = op._expand(v, op.v_map, op._v_group)  # (B, Hq, Sk, dv)
        return torch.matmul(p, v)  # (B, Hq, Sq, dv)

    def to_spec(self) -> dict:
        return {"zeta": self.zeta, "gamma": self.gamma}

    @classmethod
    def from_spec(cls, spec: dict, **_) -> "ClippedSoftmax":
        return cls(spec["zeta"], spec["gamma"])

    def extra_repr(self):
        return f"zeta={self.zeta:g}, gamma={self.gamma:g}"


class SigmoidHeadGate(nn.Module):
    """g_i(t) = sigmoid(w_i·x_i(t) + b_i) / π_init, per head i and token t (gated attention).

    Per head (default): x [.., D] is split into Hq slices of D/Hq and head i reads slice i
    (``weight [Hq, D/Hq]``). ``all_features``: every head reads all of x (``weight [Hq, D]``).
    With zero weights and b = logit(π_init) every gate is exactly 1.
    """

    def __init__(self, heads: int, dim: int, all_features: bool = False, pi_init: float = 0.5,
                 std: float = 0.0, seed: int = 0):
        super().__init__()
        if not all_features and dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        width = dim if all_features else dim // heads
        weight = torch.zeros(heads, width)
        if std > 0:
            weight.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.full((heads,), math.log(pi_init / (1.0 - pi_init))))
        self.all_features = all_features
        self.scale = 1.0 / pi_init
        self.slices = None  # after select(): which of the original head slices of x each head reads
        self.n_slices = heads

    def select(self, keep: torch.Tensor) -> "SigmoidHeadGate":
        """The gate of the query heads ``keep`` only (each still reads its own slice of x): exact."""
        new = copy.deepcopy(self)
        new.weight = nn.Parameter(self.weight.detach()[keep].clone())
        new.bias = nn.Parameter(self.bias.detach()[keep].clone())
        if not self.all_features:
            slices = torch.arange(self.n_slices) if self.slices is None else self.slices
            new.slices = slices[keep].clone()
        return new

    def to_spec(self) -> dict:
        return {"heads": self.weight.shape[0], "width": self.weight.shape[1], "all_features": self.all_features,
                "scale": self.scale, "n_slices": self.n_slices,
                "slices": None if self.slices is None else self.slices.tolist()}

    @classmethod
    def from_spec(cls, spec: dict, **_) -> "SigmoidHeadGate":
        """An uninitialised gate of this shape (the weights file fills it)."""
        n, width = spec["n_slices"], spec["width"]
        gate = cls(n, width if spec["all_features"] else width * n, spec["all_features"], 1.0 / spec["scale"])
        gate.weight = nn.Parameter(torch.zeros(spec["heads"], width))
        gate.bias = nn.Parameter(torch.zeros(spec["heads"]))
        gate.slices = None if spec["slices"] is None else torch.tensor(spec["slices"], device="cpu")
        return gate

    def forward(self, op, x, q=None):
        if self.all_features:
            logits = F.linear(x, self.weight, self.bias)  # (.., D) -> (.., Hq)
        else:
            xh = x.unflatten(-1, (self.n_slices, self.weight.shape[1]))  # (.., H0, D/H0)
            if self.slices is not None:
                xh = xh.index_select(-2, self.slices.to(x.device))  # (.., Hq, D/H0)
            logits = (xh * self.weight).sum(-1) + self.bias  # (.., Hq)
        g = torch.sigmoid(logits)
        if self.scale != 1.0:
            g = g * self.scale
        return heads_first(g, op.info.layout)  # (B, Hq, Sq)

    def extra_repr(self):
        return f"heads={self.weight.shape[0]}, in={self.weight.shape[1]}, scale={self.scale:g}"


class MoHGate(nn.Module):
    """Mixture-of-Head gates: heads [0, h_s) shared (always on), the other E = Hq − h_s routed, top-K.

    learned (MoH-ViT): shared g = α1·softmax(W_s x)·h_s, routed g = α2·(top-K softmax(W_r x),
    renormalised)·K, [α1, α2] = softmax(W_h x)·2. All weights start at zero.
    qnorm (MoH-LLaMA3): no parameters; routed logit ‖q_i‖ of the pre-RoPE query, divided by its std over
    the routed heads, softmax, top-K; the gate is the binary mask.
    The last routing probabilities are kept (not while exporting) for ``load_balance_loss``.
    """

    def __init__(self, heads: int, dim: int, shared: int, top_k: int, router: str = "learned"):
        super().__init__()
        self.heads, self.shared, self.top_k, self.router = heads, shared, top_k, router
        routed = heads - shared
        learned = router == "learned"
        self.w_shared = nn.Parameter(torch.zeros(shared, dim)) if learned and shared > 1 else None
        self.w_routed = nn.Parameter(torch.zeros(routed, dim)) if learned and routed > 0 else None
        self.w_type = nn.Parameter(torch.zeros(2, dim)) if learned and shared > 0 and routed > 0 else None
        self._last: dict = {}  # "probs", "mask": (B*S, E) of the last call

    def _routed(self, op, x):
        """Routing probabilities (N, E) over the routed heads, N = tokens in x's own order."""
        if self.router == "learned":
            return torch.softmax(F.linear(x, self.w_routed), dim=-1).flatten(0, -2)
        q = op._split(x, op.wq, op.bq)  # pre-RoPE q, (B, Hq, S, dh)
        norms = q[:, self.shared:].norm(dim=-1)  # (B, E, S)
        norms = norms.permute(2, 0, 1) if op.info.layout == "SBD" else norms.transpose(1, 2)  # x's order
        logits = norms.flatten(0, -2)  # (N, E)
        if logits.shape[-1] > 1:
            logits = logits / logits.std(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
        return torch.softmax(logits, dim=-1)

    def forward(self, op, x, q=None):
        lead = x.shape[:-1]  # (B, S) or (S, B)
        routed = self.heads - self.shared
        probs = self._routed(op, x)  # (N, E)
        if self.top_k < routed:
            index = torch.topk(probs, self.top_k, dim=-1).indices
            mask = torch.zeros_like(probs).scatter(-1, index, 1.0)
        else:
            mask = torch.ones_like(probs)
        if not torch.compiler.is_compiling():
            self._last = {"probs": probs, "mask": mask}
        if self.router == "qnorm":
            g_routed = mask
            g_shared = torch.ones(probs.shape[0], self.shared, dtype=x.dtype, device=x.device)
        else:
            chosen = probs * mask
            g_routed = chosen / chosen.sum(-1, keepdim=True).clamp_min(torch.finfo(chosen.dtype).eps)
            g_routed = g_routed * self.top_k
            n = g_routed.shape[0]
            if self.w_shared is not None:
                g_shared = torch.softmax(F.linear(x, self.w_shared), dim=-1).flatten(0, -2) * self.shared
            else:
                g_shared = torch.ones(n, self.shared, dtype=x.dtype, device=x.device)
            if self.w_type is not None:
                alpha = torch.softmax(F.linear(x, self.w_type), dim=-1).flatten(0, -2) * 2.0  # (N, 2)
                g_shared, g_routed = g_shared * alpha[:, :1], g_routed * alpha[:, 1:]
        g = torch.cat([g_shared, g_routed], dim=-1).unflatten(0, lead)  # (.., Hq)
        return heads_first(g, op.info.layout)  # (B, Hq, Sq)

    def to_spec(self) -> dict:
        dims = [w.shape[1] for w in (self.w_shared, self.w_routed, self.w_type) if w is not None]
        return {"heads": self.heads, "dim": dims[0] if dims else 0, "shared": self.shared, "top_k": self.top_k,
                "router": self.router}

    @classmethod
    def from_spec(cls, spec: dict, **_) -> "MoHGate":
        return cls(spec["heads"], spec["dim"], spec["shared"], spec["top_k"], spec["router"])

    def __getstate__(self):  # copies and pickles drop the last routing (it may hold an autograd graph)
        state = self.__dict__.copy()
        state["_last"] = {}
        return state

    def load_balance_loss(self) -> torch.Tensor:
        """l_aux = E · Σ_i P̄_i f̄_i over the routed heads, from the last call (0 before any call)."""
        if not self._last:
            return torch.zeros(())
        probs, mask = self._last["probs"], self._last["mask"]
        return probs.shape[-1] * (probs.mean(0) * mask.float().mean(0)).sum()

    def extra_repr(self):
        return f"router={self.router}, heads={self.heads}, shared={self.shared}, top_k={self.top_k}"
