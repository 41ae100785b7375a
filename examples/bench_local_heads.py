"""KV-cache bytes and decode speed of ``local-heads`` (streaming heads with a bounded cache) against full attention.

A random-weight LLaMA (``--layers`` layers, ``--heads`` heads of 32, hidden 32·heads, context 16k) is filled with a
``--context``-token prompt (prefilled in chunks of ``--chunk``), then decodes ``--steps`` tokens one at a time.
Reported per model: the bytes its cache holds after the prompt (measured from the cache's tensors and
predicted from the head split), and decode tokens per second.

    python examples/bench_local_heads.py                       # 8192 tokens, 75% streaming, window 256, sinks 4
    python examples/bench_local_heads.py --kv-heads 2          # a GQA model (heads decided per KV group)
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers
from transformers import DynamicCache

import rewrite
from rewrite.cache import cache_bytes


def model_of(args):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32 * args.heads, intermediate_size=64 * args.heads,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=16384)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def run(hf, prompt, chunk: int, steps: int) -> dict:
    cache = DynamicCache()
    with torch.no_grad():
        for lo in range(0, prompt.shape[1], chunk):
            out = hf(input_ids=prompt[:, lo:lo + chunk], past_key_values=cache, use_cache=True)
        held = sum(cache_bytes(cache))
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - t0
    return {"bytes": held, "tokens_per_s": steps / seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = model_of(args)
    example = {"input_ids": torch.randint(0, 512, (1, 16))}
    spec = f"local-heads{{ratio={args.ratio},window={args.window},sinks={args.sinks},score=random}}"
    full = rewrite.convert(model, passes="", example_inputs=example, progress=False)
    local = rewrite.convert(model, passes=spec, example_inputs=example, progress=False)
    prompt = torch.randint(0, 512, (1, args.context), generator=torch.Generator().manual_seed(1))
    streaming_kv = sum(len(op._span_plan().stream_kv) if op._span_plan() else 0 for op in local.sites)
    total_kv = sum(op.kv_heads for op in local.sites)
    per_head = 2 * 32 * 4  # K and V of one head and token, fp32
    predicted = per_head * ((total_kv - streaming_kv) * args.context + streaming_kv * (args.sinks + args.window))
    print(f"{spec}: {streaming_kv} of {total_kv} KV heads streaming; {args.context}-token prompt, "
          f"{args.steps} decode steps, {args.threads} threads", flush=True)
    results = {}
    for name, conv in (("full", full), ("local-heads", local)):
        results[name] = run(conv.hf_model(), prompt, args.chunk, args.steps)
        print(f"{name}: KV {results[name]['bytes'] / 2**20:.2f} MiB, {results[name]['tokens_per_s']:.1f} tokens/s",
              flush=True)
    f, lh = results["full"], results["local-heads"]
    assert f["bytes"] == per_head * total_kv * args.context, "full cache bytes differ from the prediction"
    print(f"\n| model | KV bytes at {args.context} | vs full | predicted | decode tokens/s | vs full |\n|---|---|---|---|---|---|")
    print(f"| full attention | {f['bytes']:,} | 1 | {per_head * total_kv * args.context:,} | {f['tokens_per_s']:.1f} | 1 |")
    print(f"| `{spec}` | {lh['bytes']:,} | {lh['bytes'] / f['bytes']:.3f} | {predicted:,} | {lh['tokens_per_s']:.1f} | "
          f"{lh['tokens_per_s'] / f['tokens_per_s']:.2f}× |")


if __name__ == "__main__":
    main()
