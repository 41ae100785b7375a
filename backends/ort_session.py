"""ONNX Runtime sessions, shared by the export check, the ORT backend and the ORT decoder: the runtime version
and its known ``Attention`` problems, the provider, sessions, running one, and dynamic int8 quantization.

The problems of the standard ``Attention`` op by version and provider:

 1. CPU, 1.23.0: GQA computed wrongly → GQA exported with expanded KV heads (``gqa="auto"``) or
    refused (``gqa="native"``).
 2. CUDA, ≤ 1.24: no CUDA kernel, nodes silently fall back to CPU → refused when CUDA was asked
    for; with ``provider="auto"`` the CPU provider is used and the report says why.
 3. CUDA, 1.25–1.26: GQA only in fp16/bf16 without a mask → GQA exported with expanded KV heads.
 4. CUDA ≥ 1.27, CPU ≥ 1.23.1: native.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from rewrite.errors import BackendError

__all__ = ["CPU", "CUDA", "QUANTIZE", "CPU_CAUSAL_CHUNKS", "ort_version", "attention_problem", "choose_provider",
           "make_session", "run_session", "check_quantize", "weight_matmuls", "quantize_int8"]

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
