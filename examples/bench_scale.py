"""Time and memory of ``rewrite convert DIR --out OUT`` against model size (LLaMA-shaped random bf16 checkpoints).

    python examples/bench_scale.py --sizes 0.5B,1B,3B --root /tmp/rewrite_bench
    python examples/bench_scale.py --sizes 7B --shard-gb 2 --calibrated --layers 2   # calibrated passes

``--calibrated`` runs gqa{method=aligned}, dha and prune-heads{importance=entropy} streamed layer by layer on
``--calib-samples`` × ``--calib-tokens`` random words (a word-level tokenizer is written into the folder), and
compares peak RSS with 1.5 × (largest shard + one layer + the calibration hidden states, fp32) + 1 GiB.
``--layers N`` keeps the width and writes only the first N decoder layers: peak memory does not depend on
depth, time grows linearly with it (the table gives seconds per layer).

For each size a sharded safetensors checkpoint (bf16, random weights, written layer by layer into ~1 GiB
shards, so writing it needs one shard of memory) is made, then each pipeline runs as its own process:
``python -m rewrite convert DIR --passes SPEC --out OUT``. Its wall time, CPU time (user + system) and peak
RSS come from GNU ``time`` (``os.wait4`` if it is missing). The table compares peak RSS with the streaming bound
1.5 × (largest shard + one decoder layer + 1 GiB). Checkpoints and outputs are deleted unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

GiB = 1 << 30
VOCAB = 32000
SIZES = {  # name: (hidden, layers, heads, intermediate); MHA, so GQA has heads to merge
    "0.5B": (1024, 26, 16, 4096),
    "1B": (2048, 16, 16, 6144),
    "3B": (3072, 25, 24, 8192),
    "7B": (4096, 32, 32, 11008),
}


def layer_shapes(d: int, inter: int, i: int) -> dict:
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
            p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter), p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,)}


def write_checkpoint(folder: str, size: str, shard_bytes: int, n_layers: int = 0) -> dict:
    """A LLaMA-shaped bf16 checkpoint with random weights (its first ``n_layers`` layers); returns numbers about it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d, layers, heads, inter = SIZES[size]
    layers = n_layers or layers
    os.makedirs(folder, exist_ok=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    cfg.architectures, cfg.dtype = ["LlamaForCausalLM"], "bfloat16"
    cfg.save_pretrained(folder)
    groups = [{"model.embed_tokens.weight": (VOCAB, d)}] + [layer_shapes(d, inter, i) for i in range(layers)]
    groups.append({"model.norm.weight": (d,), "lm_head.weight": (VOCAB, d)})
    g = torch.Generator().manual_seed(0)
    shards, current, used, params = [], {}, 0, 0

    def flush():
        nonlocal current, used
        if current:
            shards.append((f"part-{len(shards)}", list(current)))
            save_file(current, os.path.join(folder, shards[-1][0]), metadata={"format": "pt"})
        current, used = {}, 0

    for group in groups:  # a layer never straddles more shards than needed; each group is made on its own
        for name, shape in group.items():
            t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            if used + t.numel() * 2 > shard_bytes:
                flush()
            current[name] = t
            used += t.numel() * 2
            params += t.numel()
    flush()
    weight_map = {}
    for k, (tmp, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(folder, tmp), os.path.join(folder, final))
        weight_map.update({n: final for n in names})
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in set(weight_map.values())]
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": params * 2}, "weight_map": weight_map}, f, indent=1)
    layer = sum(torch.Size(s).numel() for s in layer_shapes(d, inter, 0).values()) * 2
    return {"params": params, "shards": len(shards), "shard": max(sizes), "layer": layer, "heads": heads,
            "bytes": sum(sizes)}


def _reused(folder: str, size: str, n_layers: int):
    """write_checkpoint's numbers for a checkpoint of this size and depth already in ``folder``, else None."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
    except OSError:
        return None
    d, layers, heads, inter = SIZES[size]
    if (cfg["hidden_size"], cfg["num_hidden_layers"]) != (d, n_layers or layers):
        return None
    files = set(weight_map.values())
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in files]
    layer = sum(torch.Size(s).numel() for s in layer_shapes(d, inter, 0).values()) * 2
    params = (2 * VOCAB * d + d + cfg["num_hidden_layers"] * layer // 2)
    return {"params": params, "shards": len(files), "shard": max(sizes), "layer": layer, "heads": heads,
            "bytes": sum(sizes)}


def write_calibration(folder: str, samples: int, tokens: int) -> str:
    """A word-level tokenizer (w0 .. w{VOCAB-3}) in ``folder`` and ``samples`` lines of ``tokens`` random words."""
    import transformers
    from tokenizers import Tokenizer, models as tm, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"[UNK]": VOCAB - 2, "[PAD]": VOCAB - 1})
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        folder)
    g = torch.Generator().manual_seed(1)
    path = folder.rstrip("/") + "-calibration.txt"
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (tokens,), generator=g)) + "\n")
    return path


def run_convert(folder: str, spec: str, out: str, log: str, threads: int = 0, calibration: list = (),
                compute_dtype: str = "fp32") -> dict:
    """One ``rewrite convert`` process: wall s, CPU s, peak RSS bytes, exit code and how it ran.

    Measured by GNU time, whose child is forked from a small process: Linux carries the forking process's
    peak RSS into a child's ru_maxrss across exec, so os.wait4 from this (large) process would overstate it.
    """
    cmd = [sys.executable, "-m", "rewrite", "convert", folder, "--passes", spec, "--out", out, "--stream",
           "--json", out.rstrip("/") + "-report.json", *calibration]
    if calibration:
        cmd += ["--compute-dtype", compute_dtype]
    timer = shutil.which("time") or "/usr/bin/time"
    if os.path.exists(timer):
        cmd = [timer, "-f", "RUSAGE %M %U %S"] + cmd
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", COLUMNS="160")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    text = open(log).read()
    rss, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
    measured = [ln.split() for ln in text.splitlines() if ln.startswith("RUSAGE ")]
    if measured:
        rss, cpu = int(measured[-1][1]) * 1024, float(measured[-1][2]) + float(measured[-1][3])
    code = os.waitstatus_to_exitcode(status)
    extras = {}
    if code == 0 and os.path.isfile(out.rstrip("/") + "-report.json"):
        with open(out.rstrip("/") + "-report.json") as f:
            extras = json.load(f)["extras"]["streaming"]
    if code != 0:
        error = next((ln for ln in text.splitlines() if "error" in ln.lower()), text.strip()[-300:])
        mode = "refused: " + " ".join(error.replace("error:", "").split())[:200]
    elif "converting in memory" in text:
        mode = "attention of every layer in memory"
    else:
        mode = extras.get("mode", "streamed layer by layer")
    loads = _loads(out) if code == 0 and calibration else None
    return {"wall": wall, "cpu": cpu, "rss": rss, "code": code, "mode": mode, "out": _folder_bytes(out),
            "extras": extras, "loads": loads}


def _loads(out: str) -> str:
    """Load the converted folder with from_pretrained in a fresh process and run it on a few tokens."""
    code = ("import sys, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], "
            "trust_remote_code=True, dtype=torch.bfloat16); x = torch.arange(8)[None]; "
            "y = m(x, attention_mask=torch.ones_like(x)).logits; print('LOADS', type(m).__name__, bool(y.isfinite().all()))")
    done = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("LOADS")), None)
    return " ".join(line.split()[1:]) if line else "failed: " + done.stderr.strip()[-200:]


def _folder_bytes(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def pipelines(heads: int, calibrated: bool = False) -> list:
    specs = [f"gqa{{kv_heads={heads // 4}}}", "prune-heads{ratio=0.5,importance=magnitude,scope=layer}", "masa"]
    if calibrated:
        specs = [f"gqa{{kv_heads={heads // 4},method=aligned}}", "prune-heads{ratio=0.25,importance=entropy}",
                 "dha{kv_ratio=0.25}"]
    try:
        from rewrite.pipeline import available

        names = available()
    except Exception:  # noqa: BLE001 - the bench still runs what exists
        names = {}
    return [(s, s.split("{")[0] in names) for s in specs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5B,1B,3B", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--root", default="/tmp/rewrite_bench")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--only", default="", help="run only pipelines whose spec starts with this")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the conversions (0: unset)")
    ap.add_argument("--layers", type=int, default=0, help="write only the first N decoder layers (same width)")
    ap.add_argument("--calibrated", action="store_true", help="the calibrated passes, streamed layer by layer")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="bf16",
                    help="dtype of the calibrated conversions' layer forwards (rewrite convert --compute-dtype)")
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint --keep left in --root (same size)")
    args = ap.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        d, layers, heads, inter = SIZES[size]
        layers = args.layers or layers
        est = 2 * (2 * VOCAB * d + layers * (4 * d * d + 3 * d * inter))
        free = shutil.disk_usage(os.path.dirname(args.root.rstrip("/")) or "/").free
        if free < 2.2 * est:
            print(f"{size}: skipped, needs about {2.2 * est / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free")
            continue
        src = os.path.join(args.root, size)
        t = time.perf_counter()
        info = reused = _reused(src, size, layers) if args.reuse else None
        info = info or write_checkpoint(src, size, int(args.shard_gb * GiB), layers)
        calibration, hidden = [], 0
        if args.calibrated:
            text = write_calibration(src, args.calib_samples, args.calib_tokens)
            calibration = ["--calibration", text, "--calibration-batch", str(args.calib_batch),
                           "--calibration-length", str(args.calib_tokens)]
            hidden = args.calib_samples * args.calib_tokens * d * 4
        print(f"{size}: {'reused' if reused else 'wrote'} {info['params'] / 1e9:.2f}B parameters in {info['shards']} shards "
              f"({info['bytes'] / GiB:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
        bound = (1.5 * (info["shard"] + info["layer"] + hidden) + GiB if args.calibrated
                 else 1.5 * (info["shard"] + info["layer"] + GiB))
        for spec, exists in pipelines(heads, args.calibrated):
            if args.only and not spec.startswith(args.only):
                continue
            if not exists:
                rows.append((size, info, spec, None, bound))
                continue
            out = os.path.join(args.root, f"{size}-out")
            r = run_convert(src, spec, out, os.path.join(args.root, f"{size}-{spec.split('{')[0]}.log"),
                            args.threads, calibration, args.compute_dtype)
            rows.append((size, info, spec, r, bound))
            ex = r["extras"]
            print(f"  {spec}: {r['mode']}, {r['wall']:.0f} s wall, {r['cpu']:.0f} s CPU, "
                  f"peak RSS {r['rss'] / GiB:.2f} GiB (bound {bound / GiB:.2f} GiB)"
                  + (f", {ex['seconds_per_layer']:.0f} s per layer and sweep, {ex['sweeps']} sweep(s), hidden states "
                     f"{ex['hidden_state_bytes'] / GiB:.2f} GiB, {ex.get('folder')} folder, loads: {r['loads']}"
                     if "seconds_per_layer" in ex else ""), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    print_table(rows)
    return 0


def print_table(rows: list) -> None:
    head = ("size", "params", "shards", "max shard GiB", "pipeline", "how it ran", "wall s", "CPU s",
            "peak RSS GiB", "bound GiB", "RSS<bound", "s per B params")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for size, info, spec, r, bound in rows:
        if r is None:
            cells = ["not registered", "-", "-", "-", "-", "-", "-"]
        else:
            cells = [r["mode"], f"{r['wall']:.0f}", f"{r['cpu']:.0f}", f"{r['rss'] / GiB:.2f}", f"{bound / GiB:.2f}",
                     "yes" if r["rss"] < bound else "no", f"{r['wall'] / (info['params'] / 1e9):.0f}"]
        print("| " + " | ".join([size, f"{info['params'] / 1e9:.2f}B", str(info["shards"]),
                                 f"{info['shard'] / GiB:.2f}", f"`{spec}`"] + cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
