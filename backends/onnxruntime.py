"""ONNX Runtime backend: the converted model exported to ONNX and run in an ``InferenceSession``.

    OrtModule(*args, **kwargs) = tree_unflatten(session.run(inputs), output spec of the PyTorch module)

CUDAExecutionProvider when onnxruntime-gpu and a GPU are there, CPU otherwise; all graph
optimizations on. The standard ``Attention`` op is not equally supported everywhere:

 1. CPU, 1.23.0: GQA computed wrongly → GQA exported with expanded KV heads (``gqa="auto"``) or
    refused (``gqa="native"``).
 2. CUDA, ≤ 1.24: no CUDA kernel, nodes silently fall back to CPU → refused when CUDA was asked
    for; with ``provider="auto"`` the CPU provider is used and the report says why.
 3. CUDA, 1.25–1.26: GQA only in fp16/bf16 without a mask → GQA exported with expanded KV heads.
 4. CUDA ≥ 1.27, CPU ≥ 1.23.1: native.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from rewrite.backends import LoweredMixin
from rewrite.errors import BackendError

__all__ = ["lower_onnxruntime", "OrtModule", "make_session", "run_session", "attention_problem",
           "ort_version", "choose_provider", "quantize_int8", "check_quantize", "QUANTIZE"]

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
QUANTIZE = (None, "int8")
CPU_CAUSAL_CHUNKS = 8  # 1024 tokens, 8 heads: 15.2 ms -> 8.1 ms per causal GQA site on 2 cores


def ort_version() -> tuple:
    """The installed onnxruntime version as a tuple of ints, e.g. (1, 23, 1)."""
    import onnxruntime

    parts = []
    for p in onnxruntime.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def attention_problem(provider: str, *, gqa: bool, dtype: torch.dtype, masked: bool,
                      version: Optional[tuple] = None) -> Optional[str]:
    """Why the installed runtime cannot run the ONNX ``Attention`` op correctly and fast here, or None."""
    v = version or ort_version()
    name = ".".join(map(str, v))
    if provider == CPU and gqa and v[:3] == (1, 23, 0):
        return f"onnxruntime {name} computes grouped-query attention in the Attention op wrongly on CPU " \
               "(fixed in 1.23.1)"
    if provider == CUDA and v[:2] <= (1, 24):
        return f"onnxruntime {name} has no CUDA kernel for the ONNX Attention op: its nodes would silently " \
               "run on the CPU (general CUDA kernels from 1.27)"
    if provider == CUDA and v[:2] <= (1, 26) and gqa and (masked or dtype not in (torch.float16, torch.bfloat16)):
        return f"onnxruntime {name} runs GQA in the CUDA Attention op only in fp16/bf16 without a mask " \
               f"(this model: {str(dtype).replace('torch.', '')}{', masked' if masked else ''}; general from 1.27)"
    return None


def choose_provider(requested: str = "auto") -> str:
    """``auto`` → CUDA when onnxruntime-gpu and a GPU are both there, else CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    aliases = {"cpu": CPU, "cuda": CUDA}
    if requested == "auto":
        return CUDA if CUDA in available and torch.cuda.is_available() else CPU
    provider = aliases.get(requested.lower(), requested)
    if provider not in available:
        raise BackendError(f"ONNX Runtime provider {requested!r} is not available here (available: "
                           f"{', '.join(available)}); for CUDA install onnxruntime-gpu")
    return provider


def make_session(path: str, provider: str = CPU, threads: Optional[int] = None, spin: bool = True):
    """An ``InferenceSession`` with every graph optimization on, pinned to ``provider``.

    ``spin=False`` stops idle intra-op threads from busy-waiting after a run (they would take CPU
    from whatever runs next in the process, e.g. PyTorch in a benchmark).
    """
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [provider] if provider == CPU else [provider, CPU]
    session = onnxruntime.InferenceSession(path, sess_options=so, providers=providers)
    if session.get_providers()[0] != provider:
        raise BackendError(f"ONNX Runtime could not start {provider} (got {session.get_providers()}); check the "
                           "CUDA/cuDNN libraries onnxruntime-gpu needs")
    return session


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise BackendError("bfloat16 inputs cannot be passed to ONNX Runtime through numpy; use float16 or float32")
    return t.detach().cpu().contiguous().numpy()


def run_session(session, inputs: dict) -> list:
    """Feed the session's inputs by name from ``inputs``; its outputs as torch tensors (CPU)."""
    feeds = {}
    for i in session.get_inputs():
        if i.name not in inputs:
            raise BackendError(f"the ONNX graph needs input {i.name!r}; got {sorted(inputs)}")
        feeds[i.name] = _numpy(inputs[i.name])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]


def check_quantize(quantize: Optional[str]) -> None:
    if quantize not in QUANTIZE:
        raise BackendError(f"quantize={quantize!r}: expected None or 'int8' (dynamic INT8 weight matmuls)")


def weight_matmuls(model) -> list:
    """Names of the ``MatMul`` nodes of an ONNX model whose right operand is a stored weight."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_int8(path: str, out: str) -> int:
    """Dynamic INT8 quantization of every weight ``MatMul`` of ``path`` into ``out``; the count.

        X W ≈ s_x (q_x - z_x) · (q_w ⊙ s_w),   q_w = round(W / s_w) ∈ int8, s_w per output channel (stored),
                                                q_x = round(X / s_x) + z_x ∈ uint8, per run from X's range

    Attention cores, softmax and norms stay fp32. Lossy: the error is measured, not assumed.
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(path, load_external_data=False)
    nodes = weight_matmuls(model)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    try:
        quantize_dynamic(path, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True,
                         nodes_to_quantize=nodes, use_external_data_format=any(
                             t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer))
    finally:
        root.setLevel(level)
    return len(nodes)


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
    session = make_session(path, chosen, threads or torch.get_num_threads(), spin)
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
