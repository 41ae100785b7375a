"""Attention forms that rewrite refuses by name before capture, with the module that holds them.

1. Multi-head latent attention (MLA; DeepSeek-V2/V3, MiniCPM3, Kimi): keys and values are decompressed
   from a shared latent, c = W_dkv x (rank ``kv_lora_rank``), k = W_uk c, v = W_uv c, with a separate
   rotary part. Recognized by the module's own ``kv_lora_rank`` (the latent width it is built with).
"""
from __future__ import annotations

import torch

from .errors import NoAttentionError

__all__ = ["refuse_unsupported"]

MLA_FIELDS = ("kv_lora_rank",)  # the latent width: set only by multi-head latent attention


def _mla_modules(model: torch.nn.Module) -> list:
    """(module path, field, value) of every module built with a latent KV rank."""
    found = []
    for name, module in model.named_modules():
        for field in MLA_FIELDS:
            value = module.__dict__.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.append((name or type(model).__name__, field, value))
    return found


def refuse_unsupported(model: torch.nn.Module) -> None:
    """Raise ``NoAttentionError`` naming the first module whose attention form rewrite cannot capture yet."""
    mla = _mla_modules(model)
    if mla:
        name, field, value = mla[0]
        more = f" (and {len(mla) - 1} more modules)" if len(mla) > 1 else ""
        raise NoAttentionError(
            f"{name}: multi-head latent attention (MLA) is not supported yet ({field}={value}: keys and values "
            f"come from a shared compressed latent){more}. Fix: none yet; capturing MLA is tracked separately")
