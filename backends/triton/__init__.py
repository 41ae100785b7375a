"""Triton kernels: fused softmax attention and linear attention (forward only)."""
from .flash import attention_forward, attention_reference
from .linear import linear_attention_forward, linear_attention_reference

__all__ = [
    "attention_forward",
    "attention_reference",
    "linear_attention_forward",
    "linear_attention_reference",
]
