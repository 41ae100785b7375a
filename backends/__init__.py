"""Backends: eager (PyTorch SDPA, the canonical op itself), triton, onnxruntime."""
from __future__ import annotations

BACKENDS = ("eager", "triton", "onnxruntime")


class LoweredMixin:
    """What a lowered module keeps of the ``Converted`` API; ``self.converted`` is the eager model."""

    @property
    def report(self):
        return self.converted.report

    @property
    def sites(self):
        return self.converted.sites

    def save(self, path: str) -> None:
        self.converted.save(path)

    def export_onnx(self, path: str, **kwargs):
        return self.converted.export_onnx(path, **kwargs)


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
