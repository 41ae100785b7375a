"""How much of a real sentence-embedding model survives KV-head merging, without any training.

all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) is converted to 6 and to 4 KV heads per layer (kv_ratio 0.5
and 0.33) by Ainslie mean-pooling (gqa), by alignment before pooling (gqa{method=aligned}) and by
decoupled-head fusion (dha), and, when the pass is there, by pruning the same share of heads
(prune-heads). The score is the mean cosine between the converted and the original sentence
embeddings (mean-pooled last hidden state over the attention mask) on held-out sentences.

    python examples/merge_quality.py [--calibration 64] [--sentences 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

import rewrite
from rewrite.models import minilm_path, sentences, tokenizer_for


def methods(kv_heads: int, total: int = 12) -> list:
    ratio = kv_heads / total
    specs = [("mean", f"gqa{{kv_heads={kv_heads}}}"), ("aligned", f"gqa{{kv_heads={kv_heads},method=aligned}}"),
             ("dha", f"dha{{kv_ratio={ratio:.2f}}}")]
    if "prune-heads" in rewrite.pipeline.available():  # written by another pass; optional here
        specs.append(("prune-heads", f"prune-heads{{ratio={1 - ratio:.3f}}}"))
    return specs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=int, default=64, help="calibration sentences (one per batch)")
    ap.add_argument("--sentences", type=int, default=200, help="held-out sentences scored")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    folder = minilm_path()
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tok = tokenizer_for(folder)
    text = sentences()
    calibration = [{k: v for k, v in tok([s], return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
                   for s in text[:args.calibration]]
    held_out = sorted(text[args.calibration:args.calibration + args.sentences], key=len)

    def encode(batch):
        e = tok(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    batches = [encode(held_out[i:i + 50]) for i in range(0, len(held_out), 50)]

    def embed(fn):
        out = []
        with torch.no_grad():
            for b in batches:
                h, m = fn(**b)[0], b["attention_mask"][..., None].float()
                out.append((h * m).sum(1) / m.sum(1))  # mean over real tokens
        return torch.cat(out)

    reference = embed(model)
    rows = []
    for kv_heads in (6, 4):
        for method, spec in methods(kv_heads):
            t = time.perf_counter()
            conv = rewrite.convert(model, spec, example_inputs=batches[0], calibration=calibration, progress=False)
            cosine = float(torch.cosine_similarity(embed(conv), reference, -1).mean())
            stage = conv.report.to_json()["stages"][-1]
            heads = f"{sum(op.k_heads for op in conv.sites)}/{sum(op.v_heads for op in conv.sites)}"
            rows.append((kv_heads, method, spec, heads, stage["kv_cache_bytes_per_token"], cosine,
                         time.perf_counter() - t))
            print(f"  {spec}: {cosine:.4f}", flush=True)

    print(f"\nMiniLM-L6 (6 layers × 12 heads), {len(held_out)} held-out sentences, "
          f"{len(calibration)} calibration sentences")
    print(f"{'KV/layer':>8}  {'method':<12} {'spec':<34} {'K/V heads':>9} {'KV B/tok':>8} {'cosine':>7} {'s':>6}")
    for kv_heads, method, spec, total, kv_bytes, cosine, seconds in rows:
        print(f"{kv_heads:>8}  {method:<12} {spec:<34} {total:>9} {kv_bytes:>8} {cosine:>7.4f} {seconds:>6.1f}")


if __name__ == "__main__":
    main()
