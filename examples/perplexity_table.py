"""Perplexity table of every lossy pass on the bundled reference decoder ``demo-lm``, training-free and distilled.

For each pipeline: convert with calibration on training paragraphs (``calibration.txt``), measure bits per byte
on the held-out paragraphs (``heldout.txt``, modules the training never saw) with ``rewrite.evaluate``, distill
from the original for ``--steps`` steps on the training paragraphs, and measure again.

    python examples/perplexity_table.py                        # all rows, prints the Markdown table
    python examples/perplexity_table.py --only gqa --steps 50  # rows whose spec contains "gqa"

Results are cached in ``--json`` (one entry per spec and step count), so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import rewrite
from rewrite.api import restage
from rewrite.models import calibration_texts, heldout_texts, load_reference_lm, reference_lm_path, tokenizer_for

ROWS = [  # (spec, what it is compared at)
    ("gqa{kv_heads=4,method=mean}", "1/2 KV"),
    ("gqa{kv_heads=4,method=mean},refit-query,refit-output", "1/2 KV"),
    ("gqa{kv_heads=4,method=aligned}", "1/2 KV"),
    ("gqa{kv_heads=4,method=aligned},refit-output", "1/2 KV"),
    ("gqa{kv_heads=4,method=aligned},refit-query,refit-output", "1/2 KV"),
    ("dha{kv_ratio=0.5}", "1/2 KV"),
    ("dha{kv_ratio=0.5},refit-output", "1/2 KV"),
    ("dha{kv_ratio=0.5},refit-query,refit-output", "1/2 KV"),
    ("sqa{q_heads=4,kv_heads=4}", "1/2 KV, 1/2 attn FLOPs"),
    ("sqa{q_heads=4,kv_heads=4},refit-output", "1/2 KV, 1/2 attn FLOPs"),
    ("gqa{kv_heads=2,method=mean}", "1/4 KV"),
    ("gqa{kv_heads=2,method=mean},refit-query", "1/4 KV"),
    ("gqa{kv_heads=2,method=mean},refit-query,refit-output", "1/4 KV"),
    ("gqa{kv_heads=2,method=aligned}", "1/4 KV"),
    ("gqa{kv_heads=2,method=aligned},refit-output", "1/4 KV"),
    ("gqa{kv_heads=2,method=aligned},refit-query,refit-output", "1/4 KV"),
    ("dha{kv_ratio=0.25}", "1/4 KV"),
    ("dha{kv_ratio=0.25},refit-output", "1/4 KV"),
    ("dha{kv_ratio=0.25},refit-query,refit-output", "1/4 KV"),
    ("sqa{q_heads=4,kv_heads=2}", "1/4 KV, 1/2 attn FLOPs"),
    ("sqa{q_heads=4,kv_heads=2},refit-output", "1/4 KV, 1/2 attn FLOPs"),
    ("sqa{q_heads=4,kv_heads=2},refit-query,refit-output", "1/4 KV, 1/2 attn FLOPs"),
    ("prune-heads{ratio=0.5,importance=taylor}", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=taylor},refit-output", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=magnitude}", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=magnitude},refit-output", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=entropy}", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=entropy},refit-output", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=random}", "1/2 heads"),
    ("prune-heads{ratio=0.5,importance=random},refit-output", "1/2 heads"),
    ("moh{active_ratio=0.75}", "3/4 heads active"),
    ("moh{active_ratio=0.75,router=qnorm}", "3/4 heads active"),
    ("moh{active_ratio=0.75,router=qnorm},refit-output", "3/4 heads active"),
    ("lit", "linear attention"),
    ("lit{feature_map=hedgehog}", "linear attention, learned φ"),
    ("lit{window=64}", "linear + 64-token softmax window"),
    ("lit{feature_map=hedgehog,window=64}", "linear + 64-token softmax window, learned φ"),
    ("lit{feature_map=hedgehog,window=16}", "linear + 16-token softmax window, learned φ"),
    ("masa{atoms=2,fit=weights}", "1/2 attn weights, matrix PCA"),
    ("masa{atoms=2}", "1/2 attn weights, fitted on activations"),
    ("masa{atoms=2,refine_rank=8,fit=weights}", "1/2 attn weights + rank 8, matrix PCA"),
    ("masa{atoms=2,refine_rank=8}", "1/2 attn weights + rank 8, fitted on activations"),
    ("clipped-softmax{gamma=-0.01}", "same KV"),
    ("clipped-softmax{gamma=-0.01},refit-output", "same KV"),
    ("mla{kv_rank=96,rope_dims=4,method=mha2mla}", "1/2 KV"),  # 96 latent + 8 heads x 4 RoPE dims = 128 of 256
    ("mla{kv_rank=64,rope_dims=8,method=mha2mla}", "1/2 KV"),  # 64 + 8 x 8 = 128 of 256
    ("mla{kv_rank=48,rope_dims=2,method=mha2mla}", "1/4 KV"),  # 48 + 8 x 2 = 64 of 256
    ("mla{kv_rank=32,rope_dims=4,method=mha2mla}", "1/4 KV"),  # 32 + 8 x 4 = 64 of 256
    ("mla{kv_rank=112,method=transmla}", "1/2 KV"),  # 112 latent + one shared 16-dim RoPE key = 128 of 256
    ("mla{kv_rank=48,method=transmla}", "1/4 KV"),  # 48 + 16 = 64 of 256
    ("mla{kv_rank=48,method=transmla},refit-output", "1/4 KV"),
]


TRANSFER = {"lit{feature_map=hedgehog}": 100, "lit{feature_map=hedgehog,window=64}": 100,
            "lit{feature_map=hedgehog,window=16}": 100}  # per-site attention-transfer steps before distillation


def batches(tok, lines: list, size: int, max_length: int = 256) -> list:
    return [{k: v for k, v in tok(lines[i:i + size], padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
            for i in range(0, len(lines), size)]


def measure(spec: str, base, model, tok, calib: list, train: list, texts: list, steps: int, lr: float,
            lora: int = 0) -> dict:
    """Bits per byte of ``spec`` on ``texts`` training-free and after ``steps`` distillation steps."""
    t0 = time.time()
    conv = restage(base, spec, calib)  # on the one captured graph of ``base``
    stage = conv.report.stages[-1]
    row = {"spec": spec, "kv_bytes_per_token": stage.kv_cache_bytes_per_token,
           "kv_bytes_original": conv.report.stages[0].kv_cache_bytes_per_token, "params": stage.params,
           "attn_flops": stage.attn_flops, "attn_flops_original": conv.report.stages[0].attn_flops}
    ev = rewrite.evaluate(conv, texts, tokenizer=tok, stages=[stage.name], original=False, progress=False)
    row["bpb"] = ev.stages[-1].bits_per_byte
    row["worst_site_rel_err"] = max(ev.stages[-1].site_errors or [0.0])
    if steps:
        losses = rewrite.distill(conv, model, train, steps=steps, lr=lr, progress=False,
                                 transfer_steps=TRANSFER.get(spec, 0), lora=lora)
        ev = rewrite.evaluate(conv, texts, tokenizer=tok, stages=["distill"], original=False, progress=False)
        row["bpb_distilled"] = ev["distill"].bits_per_byte
        row["distill_loss"] = [round(losses[0], 4), round(losses[-1], 4)]
    row["seconds"] = round(time.time() - t0, 1)
    return row


def markdown(original: float, rows: list, steps: int) -> str:
    lines = [f"| pipeline | compared at | KV bytes | training-free bpb (Δ) | after {steps} distill steps (Δ) |",
             "|---|---|---|---|---|"]
    notes = dict(ROWS)
    for r in rows:
        kv = f"{r['kv_bytes_per_token'] / r['kv_bytes_original']:.2g}×" if r["kv_bytes_original"] else "-"
        d = f"{r['bpb_distilled']:.3f} ({r['bpb_distilled'] - original:+.3f})" if "bpb_distilled" in r else "-"
        lora = f" + LoRA {r['lora']} on the MLPs" if r.get("lora") else ""
        lines.append(f"| `{r['spec']}`{lora} | {notes.get(r['spec'], '')} | {kv} | "
                     f"{r['bpb']:.3f} ({r['bpb'] - original:+.3f}) "
                     f"| {d} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--texts", type=int, default=400, help="held-out paragraphs evaluated")
    ap.add_argument("--distill-length", type=int, default=128, help="tokens per distillation paragraph")
    ap.add_argument("--only", default="", help="comma list: rows whose spec contains one of these")
    ap.add_argument("--json", default="perplexity_table.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", type=int, default=0, help="distill with peft LoRA of this rank on the MLPs too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_reference_lm()
    tok = tokenizer_for(reference_lm_path())
    lines = calibration_texts()
    calib = batches(tok, lines[:64], 8)  # 8 batches for the passes' statistics
    train = batches(tok, lines, 8, max_length=args.distill_length)  # 32 batches of training paragraphs
    texts = heldout_texts(args.texts)

    cache = {}
    if os.path.isfile(args.json):
        with open(args.json) as f:
            cache = json.load(f)
    captured = []  # the one capture every row restages, made when a row is not cached

    def base():
        if not captured:
            captured.append(rewrite.convert(model, passes=[], example_inputs=calib[0], progress=False))
        return captured[0]

    key0 = f"original/{args.texts}"
    if key0 not in cache:
        cache[key0] = rewrite.evaluate(base(), texts, tokenizer=tok, stages=[], progress=False)["original"].bits_per_byte
    original = cache[key0]
    print(f"original: {original:.4f} bits per byte on {len(texts)} held-out paragraphs", flush=True)
    wanted = [w for w in args.only.split(",") if w]
    rows = []
    for spec, _ in ROWS:
        if wanted and not any(w in spec for w in wanted):
            continue
        key = f"{spec}/{args.steps}/{args.lr:g}/{args.texts}/{args.distill_length}" + (
            f"/lora{args.lora}" if args.lora else "")
        if key not in cache:
            try:
                cache[key] = measure(spec, base(), model, tok, calib, train, texts, args.steps, args.lr, args.lora)
                cache[key]["lora"] = args.lora
            except rewrite.RewriteError as e:
                print(f"{spec}: {type(e).__name__}: {e}", flush=True)
                continue
            with open(args.json, "w") as f:
                json.dump(cache, f, indent=1)
        r = cache[key]
        rows.append(r)
        print(f"{spec}: {r['bpb']:.4f} -> {r.get('bpb_distilled', float('nan')):.4f} ({r['seconds']} s)", flush=True)
    with open(args.json, "w") as f:
        json.dump(cache, f, indent=1)
    print()
    print(f"original: {original:.3f} bits per byte\n")
    print(markdown(original, rows, args.steps))


if __name__ == "__main__":
    main()
