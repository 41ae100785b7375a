"""ONNX Runtime backend: the converted model exported to ONNX and run in an ``InferenceSession``.

    OrtModule(*args, **kwargs) = tree_unflatten(session.run(inputs), output spec of the PyTorch module)

CUDAExecutionProvider when onnxruntime-gpu and a GPU are there, CPU otherwise; all graph
optimizations on. The standard ``Attention`` op is not equally supported everywhere: what each
runtime version gets wrong, and what is done about it, is listed in ``ort_session``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rewrite.backends import LoweredMixin
from rewrite.errors import BackendError

from . import ort_session
from .ort_session import (CPU, CPU_CAUSAL_CHUNKS, CUDA, QUANTIZE, attention_problem, check_quantize,  # noqa: F401
                          choose_provider, ort_version, quantize_int8, run_session, weight_matmuls)

__all__ = ["lower_onnxruntime", "OrtModule", "run_session", "attention_problem", "ort_version", "choose_provider",
           "quantize_int8", "check_quantize", "weight_matmuls", "QUANTIZE"]

class OrtModule(LoweredMixin, nn.Module):
    """Runs the exported file in ONNX Runtime; called like, and returning the same structure as, ``conv``."""

    def __init__(self, conv, session, folder, out_spec, template: list, provider: str):
        super().__init__()
        self.converted = conv
        self.session = session
        self.provider = provider
        self._folder = folder  # TemporaryDirectory kept alive with the module (holds the .onnx file)
        self._out_spec = out_spec
        self._template = template  # flat output leaves; tensors are replaced by ORT outputs


    @property
    def onnx_path(self) -> str:
        return self.report.extras["onnx"]["path"]

    def forward(self, *args, **kwargs):
        kw = self.converted.bind(args, kwargs)
        device = next((v.device for v in kw.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        outs = iter(t.to(device) for t in run_session(self.session, kw))
        leaves = [next(outs) if isinstance(leaf, torch.Tensor) else leaf for leaf in self._template]
        return pytree.tree_unflatten(leaves, self._out_spec)


def lower_onnxruntime(conv, provider: str = "auto", threads: Optional[int] = None, gqa: str = "auto",
                      path: Optional[str] = None, check: bool = True, spin: bool = True,
                      causal_chunks: Optional[int] = None, quantize: Optional[str] = None) -> OrtModule:
    """``conv`` exported to ONNX and wrapped in an ONNX Runtime session.

    Args:
        conv: a ``rewrite.Converted``.
        provider: "auto" | "cpu" | "cuda" (or a full provider name).
        threads: ONNX Runtime intra-op threads; default ``torch.get_num_threads()`` (same as PyTorch).
        gqa: "auto" | "native" | "expand" (see ``rewrite.backends.onnx.export_onnx``).
        path: where to write the ``.onnx`` file; default a temporary folder owned by the module.
        check: compare with PyTorch on fresh inputs (recorded in ``report.extras["onnx"]``).
        spin: let idle ONNX Runtime threads busy-wait (lower latency; off for fair benchmarks).
        causal_chunks: query chunks per causal site (``export_onnx``); default 8 on CPU, whose kernel
            computes the hidden upper blocks too, and 1 on CUDA.
        quantize: None, or "int8": weight matmuls quantized dynamically (``quantize_int8``; CPU only).
            Lossy: ``report.extras["onnx"]["max_abs_err"]`` then measures the quantization error.
    """
    from .onnx import check_file, choose_gqa, write_file

    check_quantize(quantize)
    chosen = choose_provider(provider)
    if quantize and chosen != CPU:
        raise BackendError(f"quantize={quantize!r} runs on the CPU provider only (ONNX Runtime's dynamic INT8 "
                           f"matmul kernels); use provider='cpu'")
    notes = []
    ops = conv.sites
    dtype = ops[0].wq.dtype if ops else torch.float32
    masked = any(op.info.mask_kind for op in ops)
    if chosen == CUDA:
        problem = attention_problem(CUDA, gqa=False, dtype=dtype, masked=masked)
        if problem and provider != "auto":
            raise BackendError(f"refusing {CUDA}: {problem}. Upgrade onnxruntime-gpu to >= 1.27 or use provider='cpu'")
        if problem:
            warnings.warn(f"ONNX Runtime backend on CPU: {problem}")
            notes.append(f"CPU instead of CUDA: {problem}")
            chosen = CPU
    native, note = choose_gqa(conv, gqa, chosen, check)
    if note:
        notes.append(note)
    folder = None
    if path is None:
        folder = tempfile.TemporaryDirectory(prefix="rewrite-ort-")
        path = os.path.join(folder.name, "model.onnx")
    if causal_chunks is None:
        causal_chunks = CPU_CAUSAL_CHUNKS if chosen == CPU else 1
    info = write_file(conv, path, native_gqa=native, causal_chunks=causal_chunks, quantize=quantize)
    if quantize:
        notes.append(f"{quantize}: {info['quantized_matmuls']} weight matmuls quantized dynamically (lossy)")
    session = ort_session.make_session(path, chosen, threads or torch.get_num_threads(), spin)
    if check:
        info.update(check_file(conv, session))
    import onnxruntime

    info.update(provider=chosen, onnxruntime=onnxruntime.__version__)
    conv.report.extras["onnx"] = info
    conv.report.extras["onnxruntime"] = {"provider": chosen, "version": onnxruntime.__version__,
                                         "threads": session.get_session_options().intra_op_num_threads,
                                         "notes": notes}
    conv.report.backend = "onnxruntime" + (f"-{quantize}" if quantize else "")
    with torch.no_grad():
        out = conv(**conv.example_inputs)
    template, spec = pytree.tree_flatten(out)
    return OrtModule(conv, session, folder, spec, template, chosen)
