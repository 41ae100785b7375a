"""Backends on a LLaMA-shaped model: ONNX Runtime (CPU) vs eager PyTorch, and the ``rewrite bench`` table.

A random 4-layer, 512-wide LLaMA (8 heads of 64; MHA and GQA variants), 2 threads for each runtime:

  (a) the same converted model (GQA, 2 KV heads) run by eager PyTorch and by ONNX Runtime at
      1024 tokens, median of repeated runs (the target is ONNX Runtime >= 1.5x faster);
  (b) ``rewrite bench`` of the MHA model for ``gqa{kv_heads=2}`` and ``sqa{q_heads=4,kv_heads=2}``
      (eager and ONNX Runtime; Triton when a GPU is there).

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
    """(a): one converted GQA model, eager PyTorch vs ONNX Runtime CPU; returns the speedup."""
    torch.set_num_threads(THREADS)
    conv = rewrite.convert(llama(kv_heads=2), passes="", example_inputs=example(), progress=False)
    ort = lower_onnxruntime(conv, provider="cpu", threads=THREADS, spin=False)  # no busy-wait between runs
    ids = torch.randint(0, 2048, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ort(ids).logits - conv(ids).logits).abs().max().item()
    ms = interleaved_ms({"eager": lambda: conv(ids), "ort": lambda: ort(ids)}, repeats)  # same load for both
    eager_ms, ort_ms = ms["eager"], ms["ort"]
    info = conv.report.extras["onnx"]
    console.print(f"[bold](a)[/] GQA LLaMA (8 q / 2 kv heads), batch 1 x {tokens} tokens, {THREADS} threads each: "
                  f"eager PyTorch {eager_ms:.0f} ms, ONNX Runtime {ort_ms:.0f} ms -> [bold]{eager_ms / ort_ms:.2f}x[/] "
                  f"(target >= 1.5x); max abs err {err:.2g}; {info['attention_nodes']} Attention nodes, "
                  f"kv_num_heads {info['kv_num_heads']}, onnxruntime {info['onnxruntime']}")
    return eager_ms / ort_ms


def tables(console: Console, seq_lens: list, repeats: int) -> None:
    """(b): ``rewrite bench`` of the MHA model per pipeline."""
    have = available()
    backends = ["eager", "onnxruntime"] + (["triton"] if torch.cuda.is_available() else [])
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
