"""Train the bundled reference decoder ``demo-lm``: a byte-level LLaMA on standard-library docstrings and comments.

The model is transformers' ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU), 4 layers of 8 heads, on a byte vocabulary
(ids 0..255 are the bytes, 256 is BOS, 257 is EOS/pad). The text is the docstrings (``inspect.getdoc``) and ``#``
comments of Python's standard library; the modules in ``HELD_OUT`` never reach training, and a seeded sample of
their text is written as the held-out evaluation file. Everything is seeded, so the run is reproducible on one
Python version and thread count.

    python examples/train_reference_lm.py                 # writes rewrite/data/reference_lm/
    python examples/train_reference_lm.py --steps 50      # a quick smoke run

Output: ``config.json`` and fp16 ``model.safetensors`` in ``--out``, ``heldout.txt`` (one paragraph a line) and
``train_log.json`` with the loss curve and the held-out bits per byte, ``calibration.txt`` (training paragraphs for
calibration and distillation) and a byte-level ``tokenizer.json``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import math
import os
import random
import re
import sys
import time
import tokenize
import warnings

import torch

HELD_OUT = ("json", "csv", "heapq", "fractions", "difflib", "textwrap", "zipfile", "calendar", "statistics",
            "wave", "shlex", "sched", "graphlib", "netrc", "plistlib", "colorsys", "filecmp", "quopri")
SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
        "pydoc_data", "venv", "__main__", "_pyrepl", "pydoc", "xxsubtype")
BOS, EOS = 256, 257
VOCAB = 258


def module_names() -> list:
    """Top-level standard-library modules (public, not tests or GUIs), sorted."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)


def _clean(text: str) -> str:
    return " ".join(text.split())


def module_texts(name: str) -> list:
    """Paragraphs of one module: the docstrings of it and its public members, and its source comments."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - some modules refuse to import on this platform
        return []
    out = []
    objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
    for o in objs:
        if o is not mod and str(getattr(o, "__module__", None) or name).split(".")[0] != name:
            continue  # re-exported from elsewhere
        members = [o] + ([getattr(o, a, None) for a in sorted(vars(o)) if not a.startswith("_")]
                         if inspect.isclass(o) else [])
        for m in members:
            try:
                doc = inspect.getdoc(m)
            except Exception:  # noqa: BLE001
                doc = None
            if doc:
                out += [p for p in (_clean(x) for x in re.split(r"\n\s*\n", doc)) if len(p) >= 30]
    try:
        src = inspect.getsource(mod)
    except (OSError, TypeError):
        src = ""
    comments, buf = [], []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith(("!", "-*-", "noqa", "type:", "pragma")):
                    buf.append(text)
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE) and buf:
                comments.append(" ".join(buf)); buf = []
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    out += [c for c in comments if len(c) >= 30 and sum(ch.isalpha() or ch == " " for ch in c) / len(c) > 0.8]
    seen = set()
    return [p for p in out if not (p in seen or seen.add(p)) and p.isascii() and ">>>" not in p]


def build_corpus():
    """(train paragraphs, held-out paragraphs): disjoint by module."""
    train, held = [], []
    for name in module_names():
        (held if name in HELD_OUT else train).extend(module_texts(name))
    seen = set(held)
    train = [p for p in dict.fromkeys(train) if p not in seen]
    return train, list(dict.fromkeys(held))


def make_model(hidden: int, layers: int, heads: int, inter: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                      max_position_embeddings=seq, rope_theta=10000.0, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=EOS, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.rewrite_byte_level = True
    return LlamaForCausalLM(cfg)


def _bytes_to_unicode() -> dict:
    """The printable stand-in character of every byte that byte-level BPE tokenizers use (GPT-2's table)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    return table


def save_byte_tokenizer(out: str) -> None:
    """A ``tokenizer.json`` that ``AutoTokenizer`` loads: id = byte value, ``<s>`` text ``</s>``, pad = ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> <s> $B </s>",
                                                       special_tokens=[("<s>", BOS), ("</s>", EOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   model_max_length=10 ** 6)
    fast.save_pretrained(out)


def encode(paragraphs) -> torch.Tensor:
    """One stream: BOS paragraph EOS BOS paragraph EOS ..."""
    ids = []
    for p in paragraphs:
        ids += [BOS] + list(p.encode("utf-8")) + [EOS]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def bits_per_byte(model, paragraphs, seq: int) -> float:
    """Held-out bits per byte: each paragraph is ``BOS bytes EOS``, cut into windows of ``seq`` predictions; the
    negative log-likelihood of every byte and of EOS, in bits, over the number of bytes (as ``rewrite.evaluate``)."""
    model.eval()
    nll, n = 0.0, 0
    for p in paragraphs:
        ids = encode([p])
        n += len(ids) - 2
        for s in range(0, len(ids) - 1, seq):
            x = ids[s:s + seq + 1]
            logits = model(input_ids=x[None, :-1]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
    model.train()
    return nll / n / math.log(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "rewrite", "data", "reference_lm"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inter", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--heldout-lines", type=int, default=400)
    ap.add_argument("--calibration-lines", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texts-only", action="store_true", help="write heldout.txt, calibration.txt and the tokenizer "
                                                             "into --out without training")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # one thread: reproducible reductions, and fastest on a shared 2-core machine
    random.seed(args.seed); torch.manual_seed(args.seed)
    t0 = time.time()
    train, held = build_corpus()
    random.Random(args.seed).shuffle(held)
    held = held[:args.heldout_lines]
    val = held[: len(held) // 4]  # a quarter of the held-out text is watched during training
    calib = random.Random(args.seed + 1).sample(train, args.calibration_lines)  # training text, for passes
    os.makedirs(args.out, exist_ok=True)
    for name, lines in (("heldout.txt", held), ("calibration.txt", calib)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    save_byte_tokenizer(args.out)
    if args.texts_only:
        return
    stream = encode(train)
    print(f"corpus: {len(train)} train paragraphs ({len(stream)/1e6:.2f} MB), {len(held)} held-out "
          f"paragraphs from {len(HELD_OUT)} modules ({time.time()-t0:.0f} s)", flush=True)

    model = make_model(args.hidden, args.layers, args.heads, args.inter, args.seq)
    print(f"model: {sum(p.numel() for p in model.parameters())/1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    g = torch.Generator().manual_seed(args.seed)
    log = {"args": vars(args), "python": sys.version.split()[0], "torch": torch.__version__, "loss": [], "val_bpb": []}
    model.train()
    t1 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([stream[s:s + args.seq + 1] for s in starts.tolist()])
        tgt = x[:, 1:].flatten()
        loss = torch.nn.functional.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1),
                                                 tgt.masked_fill(tgt == BOS, -100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        log["loss"].append(round(loss.item(), 4))
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            bpb = bits_per_byte(model, val, args.seq)
            log["val_bpb"].append([step + 1, round(bpb, 4)])
            print(f"step {step+1}/{args.steps} loss {loss.item()/math.log(2):.3f} bits  val {bpb:.3f} bpb  "
                  f"{time.time()-t1:.0f} s", flush=True)
    log["train_seconds"] = round(time.time() - t1, 1)

    model = model.half()
    model.config.dtype = "float16"
    model.save_pretrained(args.out, safe_serialization=True)
    model = model.float()
    log["heldout_bpb_fp16"] = round(bits_per_byte(model, held, args.seq), 4)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f)
    print(f"held-out {log['heldout_bpb_fp16']:.3f} bits per byte (fp16 weights); wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
