"""Outliers and INT8: a tiny transformer trained three ways — vanilla, clipped softmax, gated attention.

    python examples/outliers.py [--steps 1000] [--quick] [--out DIR]

Bondarenko et al. (NeurIPS 2023, METHODS.md card 8) trace the outliers that break INT8 quantization to
heads that "do nothing" by attending to a sink token, and fix them with clipped softmax (exact zeros) or
a gate (a head switches itself off). Here the fixes are ``rewrite`` passes applied before training:
``passes=[]`` (vanilla), ``"clipped-softmax{alpha=4}"`` (γ = −α/T, T = the training length) and
``"gated-attention"`` (gates exactly 1 at init), all from one initialisation.

Task: bigram-backcopy (Guo et al. 2024, active-dormant heads): a BOS token, then a random bigram model,
except that after a "trigger" token the next token copies the token before the trigger. The copy head
is needed only after triggers and is dormant (parked on BOS) elsewhere — the attention-sink mechanism.

Per variant: task loss, copy accuracy, the largest ‖x‖∞ of the residual stream and of the attention
outputs, the residual stream's kurtosis (mean over layers; 3 for a Gaussian), and the error of ONNX
Runtime static INT8 quantization (QDQ, per-tensor MinMax; weights, linear-layer inputs/outputs and the
residual stream in int8; attention cores and gates fp32 in every variant, as ONNX Runtime leaves the
standard ``Attention`` node unquantized) against the fp32 ONNX model: logits max/mean abs error, loss.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import rewrite  # noqa: E402

VARIANTS = {"vanilla": [], "clipped-softmax": "clipped-softmax{alpha=4}", "gated-attention": "gated-attention"}


@dataclasses.dataclass
class Setup:
    steps: int = 1000
    batch: int = 32
    seq: int = 48
    vocab: int = 48
    triggers: int = 3
    width: int = 64
    heads: int = 4
    layers: int = 2
    lr: float = 3e-3
    calib_batches: int = 8
    eval_batches: int = 4


# ---- the task ------------------------------------------------------------------------------------
class BigramBackcopy:
    """Token 0 is BOS, tokens 1..triggers are triggers; after a trigger the token before it repeats."""

    def __init__(self, s: Setup, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(s.vocab, s.vocab, generator=g) * 2.0
        logits[:, 0] = -math.inf  # BOS only at the start
        logits[:, 1:s.triggers + 1] += 1.5  # triggers common enough to learn the copy
        self.table = torch.softmax(logits, dim=-1)
        self.s = s

    def sample(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        s = self.s
        x = torch.zeros(batch, s.seq, dtype=torch.long)
        x[:, 1] = torch.randint(s.triggers + 1, s.vocab, (batch,), generator=gen)
        for t in range(2, s.seq):
            prev = x[:, t - 1]
            drawn = torch.multinomial(self.table[prev], 1, generator=gen).squeeze(1)
            x[:, t] = torch.where((prev >= 1) & (prev <= s.triggers), x[:, t - 2], drawn)
        return x


# ---- the model (plain PyTorch) -------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, s: Setup):
        super().__init__()
        d = s.width
        self.heads = s.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, dh)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Pre-LN decoder; returns the logits and the residual stream after every block (L, B, T, D)."""

    def __init__(self, s: Setup):
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.width)
        self.pos = nn.Embedding(2 * s.seq, s.width)  # room for the capture's check at a longer length
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.ln = nn.LayerNorm(s.width)
        self.head = nn.Linear(s.width, s.vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        stream = []
        for block in self.blocks:
            x = block(x)
            stream.append(x)
        return self.head(self.ln(x)), torch.stack(stream)


# ---- training and measuring ----------------------------------------------------------------------
def train(conv, task: BigramBackcopy, s: Setup, seed: int = 1) -> float:
    opt = torch.optim.AdamW(conv.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50))
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(s.steps):
        x = task.sample(s.batch, gen)
        logits, _ = conv(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, s.vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def kurtosis(t: torch.Tensor) -> float:
    t = t.double().flatten()
    return float(((t - t.mean()) ** 4).mean() / t.var(unbiased=False) ** 2)


def measure(conv, task, batches) -> dict:
    """Loss, copy accuracy, ‖x‖∞ of the residual stream and attention outputs, mean kurtosis."""
    attn = []
    hooks = [op.register_forward_hook(lambda m, a, out: attn.append(out.detach().abs().max())) for op in conv.sites]
    losses, hits, copies, inf_norm, kurt = [], 0, 0, 0.0, []
    try:
        with torch.no_grad():
            for x in batches:
                logits, stream = conv(x)
                losses.append(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    x[:, 1:].reshape(-1))))
                where = (x[:, :-1] >= 1) & (x[:, :-1] <= task.s.triggers)  # the next token is a copy
                hits += int((logits[:, :-1].argmax(-1) == x[:, 1:])[where].sum())
                copies += int(where.sum())
                inf_norm = max(inf_norm, float(stream.abs().max()))
                kurt.append(sum(kurtosis(layer) for layer in stream) / len(stream))
    finally:
        for h in hooks:
            h.remove()
    return {"loss": sum(losses) / len(losses), "copy_acc": hits / max(copies, 1), "max_inf_norm": inf_norm,
            "max_attn_out": float(max(attn)), "kurtosis": sum(kurt) / len(kurt)}


# ---- ONNX export and INT8 quantization ------------------------------------------------------------
def export(conv, path: str) -> str:
    """The project's ONNX backend (checked in ONNX Runtime); plain torch.onnx.export if it fails."""
    try:
        conv.export_onnx(path)
        return "rewrite"
    except Exception:  # noqa: BLE001 - fall back to the plain exporter
        torch.onnx.export(conv.gm, (), path, kwargs={**conv.example_inputs, **conv.fixed}, dynamo=True)
        return "torch.onnx"


def quantizable_nodes(path: str) -> list:
    """Linear layers (MatMul/Gemm + bias Add) and residual Adds; not the attention cores and gates."""
    import onnx

    def scopes(node):
        return next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")

    return [n.name for n in onnx.load(path).graph.node if n.op_type in ("MatMul", "Gemm", "Add")
            and ".score_fn" not in scopes(n) and ".head_gate" not in scopes(n)]


def quantize(fp32: str, int8: str, calibration: list) -> None:
    """ONNX Runtime static quantization: QDQ, int8 weights and activations, MinMax calibration."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"idx": x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=False, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=["MatMul", "Gemm", "Add"], nodes_to_quantize=quantizable_nodes(fp32))


def int8_error(fp32: str, int8: str, batches: list, vocab: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()  # basic level, Q/DQ explicit: ORT 1.32's extended level breaks the gated model
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ref, q = (ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in (fp32, int8))
    max_err, sum_err, n, losses, shapes_match = 0.0, 0.0, 0, [], True
    for x in batches:
        a, b = ref.run(None, {"idx": x.numpy()}), q.run(None, {"idx": x.numpy()})
        shapes_match &= all(u.shape == w.shape for u, w in zip(a, b)) and len(a) == len(b)
        d = np.abs(a[0] - b[0])
        max_err, sum_err, n = max(max_err, float(d.max())), sum_err + float(d.sum()), n + d.size
        logits = torch.from_numpy(b[0])
        losses.append(float(F.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))))
    return {"int8_max_err": max_err, "int8_mean_err": sum_err / n, "int8_loss": sum(losses) / len(losses),
            "int8_shapes_match": bool(shapes_match), "int8_outputs": len(b)}


def run(s: Setup, out: str, log=print) -> list:
    torch.manual_seed(0)
    task = BigramBackcopy(s)
    base = TinyLM(s)  # one initialisation for all three variants
    example = task.sample(4, torch.Generator().manual_seed(5))
    calib_gen, eval_gen = torch.Generator().manual_seed(6), torch.Generator().manual_seed(7)
    calibration = [task.sample(s.batch, calib_gen) for _ in range(s.calib_batches)]
    evaluation = [task.sample(s.batch, eval_gen) for _ in range(s.eval_batches)]
    rows = []
    for name, passes in VARIANTS.items():
        t0 = time.perf_counter()
        conv = rewrite.convert(copy.deepcopy(base), passes=passes, example_inputs=(example,), progress=False)
        final = train(conv, task, s)
        row = {"variant": name, "pipeline": conv.report.pipeline or "(none)", "train_loss": final,
               "params": conv.report.stages[-1].params, **measure(conv, task, evaluation)}
        stem = os.path.join(out, name)
        row["exporter"] = export(conv, stem + ".onnx")
        quantize(stem + ".onnx", stem + ".int8.onnx", calibration)
        row.update(int8_error(stem + ".onnx", stem + ".int8.onnx", evaluation, s.vocab))
        row["seconds"] = time.perf_counter() - t0
        log(f"{name}: done in {row['seconds']:.1f} s")
        rows.append(row)
    with open(os.path.join(out, "outliers.json"), "w") as f:
        json.dump({"setup": dataclasses.asdict(s), "rows": rows}, f, indent=1)
    return rows


def table(rows: list, s: Setup) -> Table:
    t = Table(title=f"bigram-backcopy, {s.layers} layers × {s.heads} heads × {s.width}, {s.steps} steps; "
                    "INT8 = ONNX Runtime static QDQ vs the fp32 ONNX model")
    cols = [("variant", "variant", "{}"), ("loss", "loss", "{:.3f}"), ("copy acc", "copy_acc", "{:.3f}"),
            ("max ‖x‖∞", "max_inf_norm", "{:.1f}"), ("max |attn|", "max_attn_out", "{:.2f}"),
            ("kurtosis", "kurtosis", "{:.1f}"), ("INT8 loss", "int8_loss", "{:.3f}"),
            ("INT8 max err", "int8_max_err", "{:.3f}"), ("INT8 mean err", "int8_mean_err", "{:.4f}")]
    for title, _, _ in cols:
        t.add_column(title, justify="left" if title == "variant" else "right")
    for r in rows:
        t.add_row(*[fmt.format(r[key]) for _, key, fmt in cols])
    return t


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 1000)")
    ap.add_argument("--quick", action="store_true", help="a tiny run (for tests): few steps, short sequences")
    ap.add_argument("--out", default=None, help="folder for the ONNX files and outliers.json (default: a temp dir)")
    args = ap.parse_args(argv)
    s = Setup(steps=20, batch=8, seq=16, calib_batches=2, eval_batches=2) if args.quick else Setup()
    if args.steps is not None:
        s.steps = args.steps
    out = args.out or tempfile.mkdtemp(prefix="outliers-")
    os.makedirs(out, exist_ok=True)
    console = Console(width=None if sys.stdout.isatty() else 132)
    threads, level = torch.get_num_threads(), logging.getLogger().level
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation notes while copying
            rows = run(s, out, log=console.log)
    finally:
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(level)
    console.print(table(rows, s))
    console.print(f"ONNX files and outliers.json in {out}")
    return rows


if __name__ == "__main__":
    main()
