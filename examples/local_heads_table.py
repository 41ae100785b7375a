"""Held-out perplexity of ``local-heads`` on the bundled reference decoder ``demo-lm`` (context 256): every score
(duo, retrieval, distance, random) at 50% and 75% streaming heads, windows 32 and 64, 4 sinks.

Two held-out sets, evaluated in windows of 256 tokens so that most predictions have context beyond the
streaming heads' window: *documents* (held-out paragraphs joined into ~1 KB documents) and *recall* (a paragraph,
then other paragraphs, then the first paragraph again, ≤ 250 bytes: predicting the repeat needs the keys of
its first copy, more than the window back). Calibration is training paragraphs joined the same way (the passes'
statistics and the passkey insertions of duo / retrieval).

    python examples/local_heads_table.py                  # prints the Markdown table
    python examples/local_heads_table.py --windows 32 --docs 40

Results are cached in ``--json`` (one entry per spec), so an interrupted run resumes.
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

SCORES = ("duo", "retrieval", "distance", "random")


def documents(lines: list, size: int = 1000) -> list:
    """Paragraphs joined with newlines into documents of about ``size`` bytes."""
    docs, cur = [], ""
    for line in lines:
        cur = f"{cur}\n{line}" if cur else line
        if len(cur.encode()) >= size:
            docs.append(cur)
            cur = ""
    return docs


def recall_texts(lines: list, gap: int = 120, limit: int = 250) -> list:
    """A paragraph, ≥ ``gap`` bytes of other paragraphs, the paragraph again; at most ``limit`` bytes."""
    out, i = [], 0
    while i < len(lines):
        first, i = lines[i], i + 1
        if len(first) > 60:
            continue
        middle = ""
        while i < len(lines) and len(middle) < gap:
            middle, i = f"{middle}\n{lines[i]}" if middle else lines[i], i + 1
        text = f"{first}\n{middle}\n{first}"
        if len(text.encode()) <= limit:
            out.append(text)
    return out


def calibration(tok, docs: list, rows: int = 8, length: int = 256) -> list:
    out = []
    for i in range(0, len(docs) - rows + 1, rows):
        e = tok(docs[i:i + rows], padding=True, truncation=True, max_length=length, return_tensors="pt")
        out.append({"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", default="32,64")
    ap.add_argument("--ratios", default="0.5,0.75")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--docs", type=int, default=60, help="held-out documents of ~1 KB")
    ap.add_argument("--calib-docs", type=int, default=32)
    ap.add_argument("--json", default="local_heads_table.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_reference_lm()
    tok = tokenizer_for(reference_lm_path())
    train = calibration_texts()
    calib = calibration(tok, documents(train)[:args.calib_docs])
    texts = documents(heldout_texts())[:args.docs]
    recall = recall_texts(heldout_texts())[:args.docs]
    cache = json.load(open(args.json)) if os.path.isfile(args.json) else {}
    base = rewrite.convert(model, passes=[], example_inputs=calib[0], progress=False)
    if "original" not in cache:
        cache["original"] = {name: rewrite.evaluate(base, t, tokenizer=tok, window=256, stages=[],
                                                    progress=False)["original"].bits_per_byte
                             for name, t in (("documents", texts), ("recall", recall))}
    original = cache["original"]
    print(f"original: {original} bits per byte on {len(texts)} documents / {len(recall)} recall texts", flush=True)
    rows = []
    for window in map(int, args.windows.split(",")):
        for ratio in map(float, args.ratios.split(",")):
            for score in SCORES:
                spec = f"local-heads{{ratio={ratio},window={window},sinks={args.sinks},score={score}}}"
                if spec not in cache:
                    t0 = time.time()
                    conv = restage(base, spec, calib)
                    cache[spec] = {"seconds": 0.0}
                    for name, t in (("documents", texts), ("recall", recall)):
                        ev = rewrite.evaluate(conv, t, tokenizer=tok, window=256, original=False,
                                              stages=[conv.report.stages[-1].name], progress=False)
                        cache[spec][name] = ev.stages[-1].bits_per_byte
                    cache[spec]["seconds"] = round(time.time() - t0, 1)
                    with open(args.json, "w") as f:
                        json.dump(cache, f, indent=1)
                r = cache[spec]
                rows.append((window, ratio, score, r))
                print(f"{spec}: documents {r['documents']:.4f}, recall {r['recall']:.4f} ({r['seconds']} s)", flush=True)
    for name in ("documents", "recall"):
        print(f"\n{name}: original (all heads full) {original[name]:.3f} bits per byte\n")
        print("| window | streaming heads | " + " | ".join(SCORES) + " |")
        print("|---|---|" + "---|" * len(SCORES))
        for window in map(int, args.windows.split(",")):
            for ratio in map(float, args.ratios.split(",")):
                got = {s: r[name] for w, q, s, r in rows if w == window and q == ratio}
                best = min(got.values())
                cells = [(f"**{got[s]:.3f}**" if got[s] == best else f"{got[s]:.3f}")
                         + f" ({got[s] - original[name]:+.3f})" for s in SCORES]
                print(f"| {window} | {ratio:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
