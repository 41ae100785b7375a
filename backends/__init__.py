"""Backends: eager (PyTorch SDPA, the canonical op itself), triton, onnxruntime."""
from __future__ import annotations

BACKENDS = ("eager", "triton", "onnxruntime")


def lower(conv, backend: str):
    """Return ``conv`` running on ``backend``."""
    from rewrite.errors import BackendError

    if backend == "eager":
        return conv
    if backend == "triton":
        from .triton.lowering import lower_triton
        return lower_triton(conv)
    if backend == "onnxruntime":
        from .onnxruntime import lower_onnxruntime
        return lower_onnxruntime(conv)
    raise BackendError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
