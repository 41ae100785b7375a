"""``rewrite bench``: wall-clock of the original model vs the converted one, per backend and length.

    speedup(backend, S) = median_t(original, S) / median_t(converted on backend, S)

printed beside the theoretical ratios of the report (original / converted): attention FLOPs
(score and value matmuls, ∝ Hq) and KV-cache bytes per token (∝ Hk·dh + Hv·dv). Everything runs in
one process with the same thread count for PyTorch and ONNX Runtime (``threads``, default 2); the
runs of the original and of every backend are interleaved so that all see the same machine load.
A backend that cannot run here (no GPU for Triton, a refusal) becomes a row with the reason.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .errors import RewriteError

__all__ = ["bench", "BenchTable", "inputs_at", "interleaved_ms"]


@dataclasses.dataclass
class BenchTable:
    """Rows of ``bench``: one per backend and sequence length."""

    pipeline: str
    threads: int
    rows: list = dataclasses.field(default_factory=list)  # dicts, see COLUMNS
    COLUMNS = ("backend", "seq_len", "original_ms", "converted_ms", "speedup", "attn_flop_ratio", "kv_bytes_ratio",
               "note")

    def to_markdown(self) -> str:
        lines = [f"pipeline: `{self.pipeline or '(none)'}`, {self.threads} threads", "",
                 "| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in self.COLUMNS) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        t = Table(title=f"rewrite bench: {self.pipeline or '(capture only)'} ({self.threads} threads, median)")
        heads = ("backend", "seq", "original ms", "converted ms", "speedup", "attn FLOP ratio", "KV bytes ratio",
                 "note")
        for h in heads:
            t.add_column(h, justify="left" if h in ("backend", "note") else "right")
        for r in self.rows:
            t.add_row(*(_cell(r.get(c)) for c in self.COLUMNS))
        console.print(t)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 1000 else f"{v:,.0f}"
    return str(v)


def _seq_dims(conv) -> dict:
    """Input name -> the dims that are the sequence (dim 1; dim 0 for seq-first "SBD" sites)."""
    seq_first = any(op.info.layout == "SBD" for op in conv.sites)
    out = {}
    for name, dims in conv.dim_symbols.items():
        wanted = [d for d in dims if d == (0 if seq_first else 1)]
        t = conv.example_inputs[name]
        if t.dim() == 4 and t.shape[1] == 1:  # (B, 1, S, S) masks: both sequence dims
            wanted = [d for d in dims if d >= 2]
        if wanted:
            out[name] = wanted
    return out


def inputs_at(conv, seq_len: int) -> dict:
    """The example inputs with every sequence dim set to ``seq_len`` (tokens repeated cyclically)."""
    dims = _seq_dims(conv)
    if not dims:
        raise RewriteError("the model's inputs have no dynamic sequence dimension to benchmark over "
                           "(images, or a capture with static shapes)")
    out = dict(conv.example_inputs)
    for name, ds in dims.items():
        t = out[name]
        for d in ds:
            t = t.index_select(d, (torch.arange(seq_len) % t.shape[d]).to(t.device))
        out[name] = t
    return out


def interleaved_ms(fns: dict, repeats: int, advance=lambda: None) -> dict:
    """Median ms of each function; runs are interleaved (a, b, c, a, b, c, ...) so that all of them
    see the same machine load, after one warm-up each (kernel compilation, ORT allocations)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        sync()
        for _ in range(max(1, repeats)):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t0)
            advance()
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _lower(conv, backend: str, threads: int):
    """(module, note): the converted model on ``backend``, or (None, why not)."""
    from rewrite.errors import BackendError

    try:
        if backend == "eager":
            return conv, ""
        if backend in ("onnxruntime", "onnxruntime-int8"):
            from rewrite.backends.onnxruntime import lower_onnxruntime

            quantize = "int8" if backend.endswith("int8") else None
            module = lower_onnxruntime(conv, provider="cpu" if quantize else "auto", threads=threads, spin=False,
                                       quantize=quantize)
            err = conv.report.extras["onnx"].get("max_abs_err")
            return module, f"lossy: max abs err {err:.2g} vs PyTorch fp32" if quantize and err is not None else ""
        if backend == "triton":
            from rewrite.backends.triton._common import is_interpreted
            from rewrite.backends.triton.flash import _attn_fwd_kernel
            from rewrite.backends.triton.lowering import lower_triton

            if is_interpreted(_attn_fwd_kernel):
                return None, "skipped: TRITON_INTERPRET=1 (CPU interpreter, not timed)"
            device = next(iter(conv.example_inputs.values())).device
            if device.type != "cuda":
                return None, "skipped: needs the model on a CUDA GPU"
            return lower_triton(conv), ""
        from rewrite.backends import lower

        return lower(conv, backend), ""
    except BackendError as e:
        return None, f"skipped: {e}"


def bench(model, passes, backends=("eager",), seq_lens=(128, 512, 1024), repeats: int = 5, example=None,
          calibration=None, threads: int = 2, progress: bool = True) -> BenchTable:
    """Time ``model`` and its conversion by ``passes`` on each backend at each sequence length.

    Args:
        model: the PyTorch model (never mutated).
        passes: pipeline spec (string or list), as for ``rewrite.convert``.
        backends: any of "eager", "onnxruntime", "triton", and "onnxruntime-int8" (weight matmuls
            quantized dynamically: lossy, its error is in the ``note``).
        seq_lens: sequence lengths; inputs are the example's tokens repeated to that length.
        repeats: timed runs per measurement (after one warm-up); the median is reported.
        example: example inputs (tuple or dict) for the conversion; batch size stays the example's.
        calibration: calibration batches for passes that need them (default: the example).
        threads: ``torch.set_num_threads`` and ONNX Runtime intra-op threads.
    Returns:
        a ``BenchTable`` (``.rows``, ``.print(console)``, ``.to_markdown()``).
    """
    import rewrite
    from rewrite.backends import BACKENDS

    valid = BACKENDS + ("onnxruntime-int8",)
    if example is None:
        raise RewriteError("bench needs example inputs (a tuple of args or a dict of kwargs for the model)")
    unknown = [b for b in backends if b not in valid]
    if unknown:
        raise RewriteError(f"unknown backend(s) {unknown}; valid backends: {', '.join(valid)}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        calib = calibration if calibration is not None else [example]
        conv = rewrite.convert(model, passes=passes, example_inputs=example, calibration=calib, progress=False)
        first, last = conv.report.stages[0], conv.report.stages[-1]
        flop_ratio = first.attn_flops / last.attn_flops if last.attn_flops else None
        kv_ratio = (first.kv_cache_bytes_per_token / last.kv_cache_bytes_per_token
                    if last.kv_cache_bytes_per_token else None)
        table = BenchTable(conv.report.pipeline, threads)
        lowered = {b: _lower(conv, b, threads) for b in backends}
        inputs = {s: inputs_at(conv, s) for s in seq_lens}

        def original(kw):
            return model(**kw, **conv.fixed)

        with _progress(progress, len(seq_lens) * max(1, repeats)) as advance:
            for s in seq_lens:
                kw = inputs[s]
                fns = {None: lambda kw=kw: original(kw)}
                fns.update({b: (lambda kw=kw, m=m: m(**kw)) for b, (m, _) in lowered.items() if m is not None})
                ms = interleaved_ms(fns, repeats, lambda s=s: advance(f"{s} tokens"))
                for b in backends:
                    t = ms.get(b)
                    table.rows.append({"backend": b, "seq_len": s, "original_ms": ms[None], "converted_ms": t,
                                       "speedup": ms[None] / t if t else None, "attn_flop_ratio": flop_ratio,
                                       "kv_bytes_ratio": kv_ratio, "note": lowered[b][1] or None})
        return table
    finally:
        torch.set_num_threads(before)


class _progress:
    """A rich progress bar (transient) with ``advance(description)``; silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda description: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("bench", total=self.total)
        return lambda description: self.bar.update(task, advance=1, description=description)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
