"""A model's own gate between the attention output and the output projection, as an ``Attention.head_gate``.

    out = W_o · (o ⊙ act(W_g x + b_g)) + b_o     (Qwen3-Next, AFMoE, HRM, LFM, Laguna)

kept per query head: o_i ← o_i ⊙ g_i with g_i = act(W_g^i x + b_g^i), ``weight [Hq, dg, D]``, dg = dv (one gate
per feature) or 1 (one gate per head). ``act`` is the model's elementwise map (sigmoid, softplus, casts, scalar
scaling), an fx graph taken from the captured graph. Each head's gate reads only its own rows of W_g, so
head-count passes slice it with the query heads (``select``) and stay exact where they are exact.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["OutputGate"]


class OutputGate(nn.Module):
    """g [B, Hq, Sq] (dg = 1) or [B, Hq, Sq, dv], called as ``gate(op, x, q)`` like the other head gates."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], act: fx.GraphModule,
                 description: str = ""):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # [Hq, dg, D]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())  # [Hq, dg]
        self.act = act
        self.description = description

    @property
    def per_head(self) -> bool:
        return self.weight.shape[1] == 1

    def select(self, keep: torch.Tensor) -> "OutputGate":
        """The gate of the query heads ``keep`` only (each keeps its own rows of W_g): exact."""
        new = copy.copy(self)
        new._parameters = dict(self._parameters)
        new.weight = nn.Parameter(self.weight.detach()[keep].clone())
        new.bias = None if self.bias is None else nn.Parameter(self.bias.detach()[keep].clone())
        return new

    def forward(self, op, x, q=None):
        h, dg, dim = self.weight.shape
        y = F.linear(x, self.weight.reshape(h * dg, dim), None if self.bias is None else self.bias.reshape(-1))
        y = y.unflatten(-1, (h, dg))  # (B, S, Hq, dg) | (S, B, Hq, dg)
        y = y.transpose(1, 2) if op.info.layout != "SBD" else y.permute(1, 2, 0, 3)  # (B, Hq, S, dg)
        g = self.act(y)
        return g[..., 0] if dg == 1 else g

    def to_spec(self) -> dict:
        from .fx_json import graph_to_json

        return {"shape": list(self.weight.shape), "bias": self.bias is not None, "description": self.description,
                "act": graph_to_json(self.act)}

    @classmethod
    def from_spec(cls, spec: dict, **_) -> "OutputGate":
        """An uninitialised gate of this shape (the weights file fills it)."""
        from .fx_json import graph_from_json

        shape = spec["shape"]
        bias = torch.zeros(shape[:2]) if spec["bias"] else None
        return cls(torch.zeros(shape), bias, graph_from_json(spec["act"]), spec["description"])

    def extra_repr(self) -> str:
        h, dg, dim = self.weight.shape
        return f"heads={h}, {'per head' if dg == 1 else f'{dg} per head'}, dim={dim}: {self.description}"
