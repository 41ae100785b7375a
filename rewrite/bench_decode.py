"""``rewrite bench MODEL --passes SPEC --decode``: prefill and decode speed with a real cache, and its size.

For the original and the converted decoder, per backend and context length C:

- prefill ms: a prompt of C tokens into an empty cache;
- decode tokens/s: then ``new_tokens`` steps of one token each (greedy, fed back), the cache growing from C;
- KV bytes: measured from the cache tensors after the prefill, beside the report's prediction
  ``(kv_cache_bytes_per_token × C + state_bytes) × batch`` (the model's dtype; linear attention's state in fp32).

Backends: ``eager`` (the Hugging Face model with transformers' ``DynamicCache``; the converted model through
``conv.hf_model()``) and ``onnxruntime`` (the ONNX decoder graph with past key values). The original's and the
converted model's runs are interleaved so that both see the same machine load.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from .errors import RewriteError

__all__ = ["bench_decode", "DecodeTable"]


@dataclasses.dataclass
class DecodeTable:
    pipeline: str
    threads: int
    rows: list = dataclasses.field(default_factory=list)
    COLUMNS = ("backend", "context", "model", "prefill_ms", "decode_tok_s", "kv_bytes", "kv_bytes_predicted",
               "decode_speedup", "note")

    def to_markdown(self) -> str:
        lines = [f"pipeline: `{self.pipeline or '(none)'}`, {self.threads} threads, decode", "",
                 "| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in self.COLUMNS) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        t = Table(title=f"rewrite bench --decode: {self.pipeline or '(capture only)'} ({self.threads} threads, median)")
        for h in self.COLUMNS:
            t.add_column(h.replace("_", " "), justify="left" if h in ("backend", "model", "note") else "right")
        for r in self.rows:
            t.add_row(*(_cell(r.get(c)) for c in self.COLUMNS))
        console.print(t)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and v >= 10000:
        return f"{v:,}"
    return str(v)


class _EagerRunner:
    """Prefill and decode steps of a Hugging Face model with a DynamicCache."""

    def __init__(self, hf):
        self.hf = hf

    def prefill(self, ids):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.hf.config)
        logits = self.hf(input_ids=ids, cache=self.cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    def step(self, token):
        return self.hf(input_ids=token, cache=self.cache, use_cache=True).logits[:, -1:].argmax(-1)

    def cache_bytes(self) -> int:
        from .cache import cache_bytes

        return sum(cache_bytes(self.cache))


class _OrtRunner:
    """The same with the ONNX decoder in ONNX Runtime (past_key_values.{i}.key/value in, present.{i}.* out)."""

    def __init__(self, conv, folder: str, threads: int):
        from rewrite.backends.onnx_generate import load_onnx_decoder

        conv.export_onnx(folder, decoder=True, check=False)
        self.decoder = load_onnx_decoder(folder, threads=threads)

    def _run(self, new):
        self.mask = np.ones((new.shape[0], self.total), dtype=np.int64)
        pos = np.arange(self.total - new.shape[1], self.total, dtype=np.int64)[None].repeat(new.shape[0], 0)
        logits, self.past = self.decoder.step(new, self.mask, pos, self.past)
        return logits[:, -1].argmax(-1)[:, None]

    def prefill(self, ids):
        ids = ids.numpy()
        self.past, self.total = self.decoder.empty_past(ids.shape[0]), ids.shape[1]
        return self._run(ids)

    def step(self, token):
        self.total += 1
        return self._run(token)

    def cache_bytes(self) -> int:
        return sum(int(t.nbytes) for t in self.past)


def _measure(runners: dict, ids, new_tokens: int, repeats: int) -> dict:
    """name -> (prefill ms, decode tokens/s, measured cache bytes after the prefill); runs interleaved."""
    prefill = {k: [] for k in runners}
    decode = {k: [] for k in runners}
    size = {}
    with torch.no_grad():
        for r in range(max(1, repeats) + 1):  # the first round warms up
            for name, run in runners.items():
                t0 = time.perf_counter()
                token = run.prefill(ids)
                t1 = time.perf_counter()
                size[name] = run.cache_bytes()
                t2 = time.perf_counter()
                for _ in range(new_tokens):
                    token = run.step(token)
                t3 = time.perf_counter()
                if r:
                    prefill[name].append((t1 - t0) * 1e3)
                    decode[name].append(new_tokens / (t3 - t2))
    return {k: (statistics.median(prefill[k]), statistics.median(decode[k]), size[k]) for k in runners}


def bench_decode(model, passes, contexts=(512, 2048, 8192), backends=("eager",), new_tokens: int = 16,
                 batch: int = 1, repeats: int = 3, example=None, calibration=None, threads: int = 2,
                 progress: bool = True) -> DecodeTable:
    """Prefill and decode speed and the measured cache size of ``model`` and its conversion by ``passes``.

    Args:
        model: a Hugging Face causal LM (never mutated).
        passes: pipeline spec, as for ``rewrite.convert``.
        contexts: prompt lengths C; decoding starts from a cache of C tokens.
        backends: "eager" and/or "onnxruntime".
        new_tokens: decode steps timed per context.
        example: example inputs for the conversion (default: random ids, batch 2 × 16).
    Returns:
        a ``DecodeTable`` (``.rows``, ``.print()``, ``.to_markdown()``).
    """
    import rewrite

    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise RewriteError(f"bench --decode needs a causal language model (a Hugging Face *ForCausalLM); "
                           f"{type(model).__name__} cannot generate")
    unknown = [b for b in backends if b not in ("eager", "onnxruntime")]
    if unknown:
        raise RewriteError(f"bench --decode: unknown backend(s) {unknown}; valid: eager, onnxruntime")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    example = example if example is not None else (torch.randint(0, vocab, (2, 16), generator=g),)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        conv = rewrite.convert(model, passes=passes, example_inputs=example,
                               calibration=calibration if calibration is not None else [example], progress=False)
        base = rewrite.convert(model, passes=[], example_inputs=example, progress=False)
        first, last = conv.report.stages[0], conv.report.stages[-1]
        predicted = {"original": (first.kv_cache_bytes_per_token, first.state_bytes),
                     "converted": (last.kv_cache_bytes_per_token, last.state_bytes)}
        table = DecodeTable(conv.report.pipeline, threads)
        with tempfile.TemporaryDirectory() as tmp:
            runners = {}
            for b in backends:
                if b == "eager":
                    runners[b] = {"original": _EagerRunner(model), "converted": _EagerRunner(conv.hf_model())}
                else:
                    runners[b] = {"original": _OrtRunner(base, os.path.join(tmp, "original"), threads),
                                  "converted": _OrtRunner(conv, os.path.join(tmp, "converted"), threads)}
            steps = [(b, c) for c in contexts for b in backends]
            for b, c in _track(steps, progress):
                ids = torch.randint(0, vocab, (batch, c), generator=g)
                got = _measure(runners[b], ids, new_tokens, repeats)
                for name in ("original", "converted"):
                    ms, tok_s, size = got[name]
                    table.rows.append({"backend": b, "context": c, "model": name, "prefill_ms": ms,
                                       "decode_tok_s": tok_s, "kv_bytes": size,
                                       "kv_bytes_predicted": (predicted[name][0] * c + predicted[name][1]) * batch,
                                       "decode_speedup": tok_s / got["original"][1] if name == "converted" else None})
        return table
    finally:
        torch.set_num_threads(before)


def _track(items, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description="bench --decode", transient=True)
