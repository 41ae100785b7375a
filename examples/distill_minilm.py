"""Distill lossy conversions of MiniLM (all-MiniLM-L6-v2) back towards the original.

For each pipeline: convert, measure the cosine between the converted and the original model's
mean-pooled sentence embeddings on held-out sentences, distill on training sentences, measure again.

    python examples/distill_minilm.py [--steps 48] [--lr 3e-4] [--passes "lit;masa{atoms=3}"]
"""
from __future__ import annotations

import argparse
import time

import torch

import rewrite
from rewrite.models import minilm_path, sentences, tokenizer_for

PIPELINES = ["moh{active_ratio=0.75}", "lit", "masa{atoms=3}", "gqa{kv_heads=4}"]


def batches(tok, lines, size, max_length):
    out = []
    for i in range(0, len(lines), size):
        e = tok(lines[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]})
    return out


def sentence_cosine(student, teacher, data) -> float:
    """Mean cosine between mean-pooled sentence embeddings."""

    def embed(model, b):
        h = model(**b).last_hidden_state  # (B, S, D)
        w = b["attention_mask"].unsqueeze(-1).float()
        return (h * w).sum(1) / w.sum(1)

    with torch.no_grad():
        return float(torch.cat([torch.cosine_similarity(embed(student, b), embed(teacher, b)) for b in data]).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", default=";".join(PIPELINES), help="pipelines separated by ';'")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train", type=int, default=384, help="training sentences")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args()

    import transformers

    torch.manual_seed(0)
    folder = minilm_path()
    teacher = transformers.AutoModel.from_pretrained(folder).eval()
    tok = tokenizer_for(folder)
    text = sentences()
    train = batches(tok, text[:args.train], args.batch, args.max_length)
    held_out = batches(tok, text[-64:], 32, args.max_length)
    available = rewrite.pipeline.available()
    print(f"MiniLM, {args.train} training / 64 held-out sentences, {args.steps} Adam steps at lr {args.lr:g}")
    print(f"{'pipeline':<24} {'cosine before':>14} {'after':>8} {'loss first → last':>22} {'seconds':>8}")
    for spec in filter(None, (s.strip() for s in args.passes.split(";"))):
        name = spec.split("{")[0]
        if name not in available:
            print(f"{spec:<24} (pass not available)")
            continue
        t0 = time.perf_counter()
        conv = rewrite.convert(teacher, spec, example_inputs=train[0], calibration=train[:4], progress=False)
        before = sentence_cosine(conv, teacher, held_out)
        losses = rewrite.distill(conv, teacher, train, steps=args.steps, lr=args.lr, progress=False)
        after = sentence_cosine(conv, teacher, held_out)
        print(f"{spec:<24} {before:>14.4f} {after:>8.4f} {losses[0]:>10.4f} → {losses[-1]:<9.4f} "
              f"{time.perf_counter() - t0:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
