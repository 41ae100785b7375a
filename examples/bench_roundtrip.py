"""Does the canonical op cost anything at run time? Original vs round-tripped (passes=[]) eager time.

    python examples/bench_roundtrip.py [--seq 1024] [--repeats 7]

Also prints how long capture + canonicalize take for MiniLM and a 12-layer, 768-wide LLaMA-shaped model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import rewrite
from rewrite.models import load_model


def llama(layers=12, hidden=768, heads=12, kv=12):
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def median_time(fn, repeats):
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, make, seq in (("MiniLM (real)", lambda: load_model("demo")[0], 256),
                            ("LLaMA 12x768", llama, args.seq)):
        model = make()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, seq))
        mask = torch.ones_like(ids)
        t = time.perf_counter()
        conv = rewrite.convert(model, passes=[], example_inputs={"input_ids": ids[:, :16].repeat(2, 1),
                                                                 "attention_mask": mask[:, :16].repeat(2, 1)},
                               progress=False, verify=False)
        capture_s = time.perf_counter() - t
        t_orig = median_time(lambda: model(input_ids=ids, attention_mask=mask), args.repeats)
        t_conv = median_time(lambda: conv(input_ids=ids, attention_mask=mask), args.repeats)
        rows.append((name, seq, capture_s, t_orig, t_conv, t_conv / t_orig))
    print(f"{'model':16} {'tokens':>6} {'capture+canon s':>15} {'original s':>10} {'converted s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r[0]:16} {r[1]:>6} {r[2]:>15.2f} {r[3]:>10.4f} {r[4]:>11.4f} {r[5]:>6.3f}")


if __name__ == "__main__":
    main()
