"""Decode speed and measured KV-cache size of converted decoders (issue 10's table in the README).

    python examples/bench_decode.py [--contexts 512,2048,8192] [--threads 2] [--backends eager,onnxruntime]

A 4-layer, 512-wide LLaMA-shaped model (8 heads of 64, MLP 1376, vocabulary 32000, random weights, fp32),
batch 1. For each pipeline: prefill ms and decode tokens/s at each context, the original's and the
converted model's runs interleaved (``rewrite.bench_decode``), and the cache bytes measured from the cache
tensors after the prefill beside the report's prediction. Run it on a quiet machine: the figures are
wall-clock and move with other load.
"""
from __future__ import annotations

import argparse

import torch

PIPELINES = ["gqa{kv_heads=2}", "mqa", "sqa{q_heads=4,kv_heads=2}", "dha{kv_ratio=0.25}",
             "moh{active_ratio=0.75}", "lit"]


def llama_4x512():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=16384)
    return transformers.LlamaForCausalLM(cfg).eval()


def main(argv=None):
    from rewrite.bench_decode import bench_decode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="eager")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipelines", default=";".join(PIPELINES), help="';'-separated pipeline specs")
    args = ap.parse_args(argv)
    model = llama_4x512()
    g = torch.Generator().manual_seed(1)
    calibration = [(torch.randint(0, 32000, (2, 64), generator=g),) for _ in range(2)]
    contexts = [int(c) for c in args.contexts.split(",")]
    lines = ["| pipeline | backend | context | prefill ms (orig → conv) | decode tok/s (orig → conv) | decode speed-up "
             "| KV bytes measured (orig → conv) | = predicted |", "|---|---|---|---|---|---|---|---|"]
    for spec in args.pipelines.split(";"):
        table = bench_decode(model, spec, contexts=contexts, backends=args.backends.split(","),
                             new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                             calibration=calibration, progress=False)
        rows = {(r["backend"], r["context"], r["model"]): r for r in table.rows}
        for b in args.backends.split(","):
            for c in contexts:
                o, n = rows[(b, c, "original")], rows[(b, c, "converted")]
                same = o["kv_bytes"] == o["kv_bytes_predicted"] and n["kv_bytes"] == n["kv_bytes_predicted"]
                lines.append(f"| `{spec}` | {b} | {c} | {o['prefill_ms']:.0f} → {n['prefill_ms']:.0f} | "
                             f"{o['decode_tok_s']:.1f} → {n['decode_tok_s']:.1f} | **{n['decode_speedup']:.2f}×** | "
                             f"{o['kv_bytes'] / 2**20:.1f} → {n['kv_bytes'] / 2**20:.2f} MiB | "
                             f"{'yes' if same else 'NO'} |")
        print("\n".join(lines[-len(contexts) * len(args.backends.split(',')):]), flush=True)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
