"""The ``rewrite`` command line: inspect, convert, analyze, distill, eval, bench, demo.

MODEL is ``demo`` (the bundled all-MiniLM-L6-v2), ``demo-lm`` (the bundled byte-level reference decoder), a local
Hugging Face folder, or ``package.module:factory``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console

from .errors import RewriteError

__all__ = ["main"]


def _load(args):
    from .models import example_inputs_for, load_model

    model, folder = load_model(args.model)
    example = example_inputs_for(model, folder, batch=args.batch, seq=args.seq)
    return model, folder, example


def _calibration(args, folder, model, option: str = "calibration"):
    """--calibration FILE (or another text option): one sample per line, tokenized with the model folder's
    tokenizer."""
    path = getattr(args, option, None)
    if not path:
        return None
    from .stream_calib import calibration_batches

    return calibration_batches(folder, path, args.calibration_batch, args.calibration_length,
                               flag="--" + option.replace("_", "-"))


def cmd_inspect(args, console):
    import rewrite

    model, _, example = _load(args)
    found = rewrite.inspect(model, example)
    from rich.table import Table

    t = Table(title=f"attention sites of {args.model}")
    for c in ("site", "q heads", "kv heads", "head size", "layout", "rope", "causal", "masked", "per-head ops"):
        t.add_column(c)
    for s in found.sites:
        t.add_row(s.name, str(s.q_heads), str(s.kv_heads), str(s.head_dim), s.layout, str(s.rope or "-"),
                  str(s.causal), str(s.masked), s.transform or "-")
    console.print(t)
    for r in found.refusals:
        console.print(f"[red]not recognized[/] {r}")
    console.print(f"{len(found.sites)} sites")
    return 0


def cmd_convert(args, console):
    import rewrite

    if args.out and args.stream:
        from .stream import convert_folder

        calib = _calibration(args, args.model, None)
        report = convert_folder(args.model, args.passes, args.out, calibration=calib, compute_dtype=args.compute_dtype)
        report.print(console)
        if args.report:
            report.to_html(args.report)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report.to_json(), f, indent=1)
        return 0
    model, folder, example = _load(args)
    calib = _calibration(args, folder, model)
    conv = rewrite.convert(model, passes=args.passes, example_inputs=example, calibration=calib,
                           backend=args.backend)
    if args.onnx and args.decoder:
        conv.export_onnx(args.onnx, decoder=True)
    elif args.onnx:
        conv.export_onnx(args.onnx, causal_chunks=args.causal_chunks, quantize=args.quantize)
    conv.report.print(console)
    if args.onnx and not args.decoder:
        console.print(onnx_summary_line(conv.report.extras["onnx"]), soft_wrap=True)
    elif args.onnx:
        info = conv.report.extras["onnx_decoder"]
        genai = info["genai"]
        console.print(f"ONNX decoder with past key values: {args.onnx} (max abs err vs PyTorch "
                      f"{info['max_abs_err']:.1e}); genai_config.json "
                      + ("written" if genai["written"] else f"not written: {genai['reason']}"), soft_wrap=True)
    if args.out:
        info = conv.save_pretrained(args.out)
        how = ("a stock folder: from_pretrained loads it without rewrite" if info["kind"] == "stock" else
               f"a custom-code folder (trust_remote_code=True, or rewrite installed), because {info['reason']}")
        console.print(f"Hugging Face folder: {args.out}, {how}", soft_wrap=True)
    if args.report:
        conv.report.to_html(args.report)
        console.print(f"report: {args.report}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(conv.report.to_markdown())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(conv.report.to_json(), f, indent=1)
    if args.save:
        conv.save(args.save)
        console.print(f"saved: {args.save}")
    return 0


def cmd_analyze(args, console):
    import rewrite

    model, folder, example = _load(args)
    calib = _calibration(args, folder, model) or [example]
    result = rewrite.analyze(model, example_inputs=example, calibration=calib)
    result.print(console)
    if args.report:
        result.to_html(args.report)
        console.print(f"report: {args.report}")
    return 0


def cmd_distill(args, console):
    import rewrite

    if bool(args.passes) == bool(args.teacher):
        raise RewriteError("distill: give --passes SPEC (convert MODEL, then distill it from MODEL) or --teacher "
                           "FOLDER (MODEL is a converted folder, distilled from the folder it was converted from)")
    if not args.calibration:
        raise RewriteError("distill needs training text: --calibration FILE (one sample per line)")
    if args.teacher:
        return _distill_folder(args, console)
    model, folder, example = _load(args)
    calib = _calibration(args, folder, model)
    conv = rewrite.convert(model, passes=args.passes, example_inputs=example, calibration=calib)
    held_out = _calibration(args, folder, model, "held_out")
    rewrite.distill(conv, model, calib, steps=args.steps, lr=args.lr, transfer_steps=args.transfer_steps,
                    eval_data=held_out, eval_every=args.eval_every, patience=args.patience, lora=args.lora)
    if int(os.environ.get("RANK", "0")) != 0:  # one of several data-parallel processes: rank 0 reports
        return 0
    conv.report.print(console)
    if args.report:
        conv.report.to_html(args.report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(conv.report.to_json(), f, indent=1)
    if args.save:
        conv.save(args.save)
    return 0


def _distill_folder(args, console):
    """rewrite distill CONVERTED --teacher ORIGINAL --calibration FILE --save OUT: neither model captured."""
    from .distill_folder import distill_folder

    if not args.save:
        raise RewriteError("distill --teacher: name the output folder with --save OUT")
    data, held_out = _calibration(args, args.teacher, None), _calibration(args, args.teacher, None, "held_out")
    result = distill_folder(args.model, args.teacher, data, args.save, steps=args.steps, lr=args.lr,
                            dtype=args.dtype, device_map=args.device_map, eval_data=held_out,
                            eval_every=args.eval_every, patience=args.patience)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    losses = result["losses"]
    console.print(f"distilled {result['trained_params']:,} parameters ({result['trained_tensors']} tensors) in "
                  f"{len(losses)} steps: loss {losses[0]:.4g} → {losses[-1]:.4g}; {result['seconds']:.0f} s, peak RSS "
                  f"{result['peak_rss_bytes'] / 2 ** 30:.2f} GiB; saved: {args.save}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


def _read_texts(path: str) -> list:
    """--text FILE: one text a line; a missing or empty file is an error that names it."""
    from .errors import EvaluationError

    if not os.path.isfile(path):
        raise EvaluationError(f"--text {path}: no such file; give a UTF-8 text file, one text a line "
                              "(e.g. rewrite/data/reference_lm/heldout.txt)")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise EvaluationError(f"--text {path}: the file holds no text; put one text a line in it")
    return lines


def cmd_eval(args, console):
    import rewrite
    from .models import tokenizer_for

    from .evaluate import require_language_model

    texts = _read_texts(args.text)
    model, folder, example = _load(args)
    require_language_model(model)
    tok = tokenizer_for(folder)
    if tok is None:
        raise rewrite.EvaluationError(f"eval: {args.model} has no tokenizer to turn --text into ids; give a "
                                      "Hugging Face folder that holds one")
    calib = _calibration(args, folder, model)
    if calib is None and args.passes:
        n = args.calibration_batch
        calib = [{k: v for k, v in tok(texts[i:i + n], padding=True, truncation=True, max_length=128,
                                      return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
                 for i in range(0, min(len(texts), 4 * n), n)]
        console.print(f"calibration: the first {min(len(texts), 4 * n)} texts of {args.text} (--calibration FILE "
                      "to use other text)", soft_wrap=True)
    conv = rewrite.convert(model, passes=args.passes, example_inputs=example, calibration=calib)
    if args.distill_steps:
        rewrite.distill(conv, model, calib or [example], steps=args.distill_steps, lr=args.lr)
    result = rewrite.evaluate(conv, texts[:args.limit] if args.limit else texts, tokenizer=tok,
                              window=args.window, batch_size=args.eval_batch)
    console.print(result.rich_table(title=f"{args.model}: {args.passes or '(capture only)'}"))
    for why in result.skipped:
        console.print(f"[yellow]not evaluated[/] {why}")
    if args.report:
        conv.report.to_html(args.report)
        console.print(f"report: {args.report}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=1)
    return 0


def cmd_bench(args, console):
    from .bench import bench

    model, folder, example = _load(args)
    if args.decode:
        from .bench_decode import bench_decode

        table = bench_decode(model, args.passes, contexts=[int(c) for c in args.contexts.split(",")],
                             backends=args.backend.split(","), new_tokens=args.new_tokens, repeats=args.repeats,
                             threads=args.threads)
    else:
        table = bench(model, args.passes, backends=args.backend.split(","),
                      seq_lens=[int(s) for s in args.seq_lens.split(",")], repeats=args.repeats, example=example,
                      threads=args.threads)
    table.print(console)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table.to_markdown())
    return 0


def cmd_demo(args, console):
    """Convert the bundled MiniLM with GQA + gated attention, verify, export ONNX, write the report."""
    import rewrite
    from .models import example_inputs_for, load_model, sentences

    out = args.out
    os.makedirs(out, exist_ok=True)
    model, folder = load_model("demo")
    example = example_inputs_for(model, folder, batch=4)
    texts = sentences()
    calib = []
    from .models import tokenizer_for

    tok = tokenizer_for(folder)
    for i in range(0, 64, 16):
        enc = tok(texts[i:i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt")
        calib.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    console.print(f"[bold]rewrite demo[/]: all-MiniLM-L6-v2, passes: {args.passes}")
    found = rewrite.inspect(model, example)
    console.print(str(found))
    conv = rewrite.convert(model, passes=args.passes, example_inputs=example, calibration=calib)
    if not args.no_onnx:  # before the reports are written, so that they hold the ONNX check
        onnx_path = os.path.join(out, "model.onnx")
        conv.export_onnx(onnx_path)
    conv.report.print(console)
    html_path = os.path.join(out, "report.html")
    conv.report.to_html(html_path)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(conv.report.to_markdown())
    console.print(f"report: {html_path} (and report.md)")
    if not args.no_onnx:
        console.print(onnx_summary_line(conv.report.extras["onnx"]), soft_wrap=True)
    return 0


def onnx_summary_line(info: dict) -> str:
    """One line on an exported file: where, its Attention nodes, and its check in ONNX Runtime."""
    heads = sorted(set(zip(info["q_num_heads"], info["kv_num_heads"])))
    line = (f"onnx: {info['path']}: {info['attention_nodes']} Attention nodes "
            f"({', '.join(f'{q} q / {k} kv heads' for q, k in heads)}), opset {info['opset']}")
    if info.get("quantize"):
        line += f", {info['quantized_matmuls']} weight matmuls in {info['quantize']}"
    if "max_abs_err" in info:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in info["checked_inputs"].items())
        line += (f"; checked in ONNX Runtime {info['onnxruntime']} on new shapes ({shapes}): "
                 f"max abs err {info['max_abs_err']:.2g}")
    return line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewrite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("model", help="demo | demo-lm | local Hugging Face folder | package.module:factory")
        sp.add_argument("--batch", type=int, default=2, help="example batch size")
        sp.add_argument("--seq", type=int, default=16, help="example sequence length (random ids)")

    def calib_args(sp):
        sp.add_argument("--calibration", help="text file, one sample per line")
        sp.add_argument("--calibration-batch", type=int, default=16)
        sp.add_argument("--calibration-length", type=int, default=128, help="tokens per sample at most")

    sp = sub.add_parser("inspect", help="list the attention sites")
    model_args(sp)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("convert", help="convert a model with a pipeline of passes")
    model_args(sp)
    calib_args(sp)
    sp.add_argument("--passes", default="", help='pipeline spec, e.g. "gqa{kv_heads=4},gated-attention"')
    sp.add_argument("--backend", default="eager", choices=["eager", "triton", "onnxruntime"])
    sp.add_argument("--onnx", help="export the converted model to this ONNX file")
    sp.add_argument("--causal-chunks", type=int, default=1,
                    help="ONNX: split causal sites into N query chunks that skip hidden key blocks "
                         "(faster on ONNX Runtime's CPU kernel; 8 is a good choice there)")
    sp.add_argument("--quantize", choices=["int8"], help="ONNX: weight matmuls quantized dynamically (lossy; the "
                                                          "check measures the error)")
    sp.add_argument("--report", help="write the HTML report here")
    sp.add_argument("--markdown", help="write the Markdown report here")
    sp.add_argument("--json", help="write the JSON report here")
    sp.add_argument("--save", help="save the converted model (.pt2)")
    sp.add_argument("--out", help="write the converted model as a Hugging Face folder here (save_pretrained)")
    sp.add_argument("--stream", action="store_true",
                    help="with --out and a Hugging Face MODEL folder: stream the checkpoint layer by layer instead "
                         "of loading it (for models larger than memory)")
    sp.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="with --stream and calibrated passes: dtype of the decoder-layer forwards over the calibration "
                         "set (bf16: faster on a bf16 checkpoint; the statistics stay fp32)")
    sp.add_argument("--decoder", action="store_true",
                    help="with --onnx DIR: export a decoder graph with past key values (and genai_config.json)")
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser("analyze", help="per-head importance, entropy, sink mass and K/V similarity")
    model_args(sp)
    calib_args(sp)
    sp.add_argument("--report", help="write the HTML report with heatmaps here")
    sp.set_defaults(func=cmd_analyze)

    sp = sub.add_parser("distill", help="convert, then distill the converted model from the original; or distill "
                                         "a converted folder from its original (--teacher)")
    model_args(sp)
    calib_args(sp)
    sp.add_argument("--passes", help="the pipeline to convert MODEL with before distilling")
    sp.add_argument("--teacher", help="MODEL is a converted Hugging Face folder (a streamed conversion's output): "
                                      "distill it from this original folder, both loaded with from_pretrained")
    sp.add_argument("--device-map", help="with --teacher: from_pretrained's device_map (e.g. auto; default: CPU)")
    sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="with --teacher: the precision both "
                                                                             "models train in (bf16 halves memory)")
    sp.add_argument("--steps", type=int, default=100)
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--transfer-steps", type=int, default=0, help="per-site attention transfer first (the "
                                                                  "changed sites alone, on the original's inputs)")
    sp.add_argument("--held-out", help="text file (one sample a line) measured before training and every "
                                       "--eval-every steps; the best parameters are kept")
    sp.add_argument("--eval-every", type=int, default=25)
    sp.add_argument("--lora", type=int, default=0, metavar="R", help="peft LoRA adapters of rank R on the "
                    "untouched Linear layers (MLPs), trained too and merged back at the end (0: none)")
    sp.add_argument("--patience", type=int, default=0, help="stop after this many held-out evaluations without "
                                                            "a new best (0: never)")
    sp.add_argument("--report")
    sp.add_argument("--json", help="write the JSON report (with the loss of every step) here")
    sp.add_argument("--save")
    sp.set_defaults(func=cmd_distill)

    sp = sub.add_parser("eval", help="perplexity and bits per byte of the original and every stage on a text file")
    model_args(sp)
    calib_args(sp)
    sp.add_argument("--passes", default="", help="pipeline spec; calibration defaults to the first texts")
    sp.add_argument("--text", required=True, help="UTF-8 text file, one text a line")
    sp.add_argument("--limit", type=int, default=0, help="evaluate only the first N texts")
    sp.add_argument("--window", type=int, help="most tokens predicted per forward pass (default: the config's "
                                               "max_position_embeddings, at most 1024)")
    sp.add_argument("--eval-batch", type=int, default=8)
    sp.add_argument("--distill-steps", type=int, default=0, help="distill from the original first (on the "
                                                                  "calibration text)")
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--report", help="write the HTML report (with the perplexity column and plot) here")
    sp.add_argument("--json", help="write the evaluation as JSON here")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("bench", help="time original vs converted per backend and sequence length")
    model_args(sp)
    sp.add_argument("--passes", default="")
    sp.add_argument("--backend", default="eager", help="comma list: eager,onnxruntime,triton,onnxruntime-int8")
    sp.add_argument("--seq-lens", default="128,512,1024")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--threads", type=int, default=2, help="PyTorch and ONNX Runtime threads")
    sp.add_argument("--decode", action="store_true",
                    help="prefill ms, decode tokens/s and measured KV-cache bytes with a real cache")
    sp.add_argument("--contexts", default="512,2048,8192", help="--decode: context lengths")
    sp.add_argument("--new-tokens", type=int, default=16, help="--decode: decode steps timed per context")
    sp.add_argument("--markdown", help="write the table as Markdown here")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("demo", help="convert the bundled MiniLM, verify, export ONNX, write the report")
    sp.add_argument("--passes", default="gqa{kv_heads=4,method=aligned},gated-attention")
    sp.add_argument("--out", default="out")
    sp.add_argument("--no-onnx", action="store_true")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=max(120, Console().width))
    try:
        return args.func(args, console)
    except RewriteError as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
