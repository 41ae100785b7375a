"""Backends on a LLaMA-shaped model: ONNX Runtime (CPU) vs eager PyTorch, and the ``rewrite bench`` table.

A random 4-layer, 512-wide LLaMA (8 heads of 64; MHA and GQA variants), 2 threads for each runtime:

  (a) the same converted model (GQA, 2 KV heads) run by eager PyTorch and by ONNX Runtime at
      1024 tokens, median of repeated runs (the target is ONNX Runtime >= 1.5x faster): fp32 with one
      Attention node per site, fp32 with 8 causal query chunks (the CPU default), INT8 weight matmuls;
  (b) ``rewrite bench`` of the MHA model for ``gqa{kv_heads=2}`` and ``sqa{q_heads=4,kv_heads=2}``
      (eager, ONNX Runtime fp32 and INT8; Triton when a GPU is there).

    python examples/bench_backends.py [--seq-lens 128,512,1024] [--repeats 5]
"""
from __future__ import annotations

import argparse

import torch
from rich.console import Console

import rewrite
from rewrite.backends.onnxruntime import lower_onnxruntime
from rewrite.bench import bench, interleaved_ms
from rewrite.pipeline import available

THREADS = 2


def llama(kv_heads: int, seed: int = 0):
    """4 layers, hidden 512, 8 heads of 64, SwiGLU 1376, random weights."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=64,
                                   max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).eval()


def example(batch: int = 2, seq: int = 32) -> tuple:
    return (torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0)),)


def ort_vs_eager(console: Console, tokens: int, repeats: int) -> float:
    """(a): one converted GQA model, eager PyTorch vs ONNX Runtime CPU; returns the fp32 speedup.

    ONNX Runtime three ways: one Attention node per site (``causal_chunks=1``), the CPU default of 8
    causal query chunks, and the same with INT8 weight matmuls (lossy; its error is printed).
    """
    torch.set_num_threads(THREADS)
    conv = rewrite.convert(llama(kv_heads=2), passes="", example_inputs=example(), progress=False)
    ids = torch.randint(0, 2048, (1, tokens), generator=torch.Generator().manual_seed(1))
    variants = {"ort, 1 node per site": dict(causal_chunks=1), "ort, 8 causal chunks": {},
                "ort int8, 8 causal chunks": dict(quantize="int8")}
    fns, errs = {"eager": lambda: conv(ids)}, {}
    for name, kw in variants.items():  # no busy-wait between runs: it would slow the next eager run
        m = lower_onnxruntime(conv, provider="cpu", threads=THREADS, spin=False, **kw)
        with torch.no_grad():
            want = conv(ids).logits
            errs[name] = ((m(ids).logits - want).abs().max().item(), want.abs().max().item())
        fns[name] = lambda m=m: m(ids)
    ms = interleaved_ms(fns, repeats)  # same load for all
    info = conv.report.extras["onnx"]
    console.print(f"[bold](a)[/] GQA LLaMA (8 q / 2 kv heads), batch 1 x {tokens} tokens, {THREADS} threads each, "
                  f"median of {repeats}; onnxruntime {info['onnxruntime']}; eager PyTorch {ms['eager']:.0f} ms")
    for name in variants:
        err, scale = errs[name]
        console.print(f"    {name:28s} {ms[name]:6.0f} ms  [bold]{ms['eager'] / ms[name]:.2f}x[/]  "
                      f"max abs err {err:.2g} (logits up to {scale:.2g})")
    return ms["eager"] / ms["ort, 8 causal chunks"]


def tables(console: Console, seq_lens: list, repeats: int) -> None:
    """(b): ``rewrite bench`` of the MHA model per pipeline."""
    have = available()
    backends = ["eager", "onnxruntime", "onnxruntime-int8"] + (["triton"] if torch.cuda.is_available() else [])
    for spec in ("gqa{kv_heads=2}", "sqa{q_heads=4,kv_heads=2}"):
        name = spec.split("{")[0]
        if name not in have:
            console.print(f"[yellow]{spec}: pass '{name}' is not available yet, skipped[/]")
            continue
        table = bench(llama(kv_heads=8), spec, backends=backends, seq_lens=seq_lens, repeats=repeats,
                      example=example(), threads=THREADS)
        table.print(console)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq-lens", default="128,512,1024")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    console = Console(width=140)
    ort_vs_eager(console, args.tokens, args.repeats)
    tables(console, [int(s) for s in args.seq_lens.split(",")], args.repeats)


if __name__ == "__main__":
    main()
