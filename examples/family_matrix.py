"""The support matrix: every text family in transformers' auto mappings, built tiny, converted with no passes.

    python examples/family_matrix.py [--only llama,gpt2] [--limit N] [--out docs/families.md]
                                     [--timeout 600] [--jsonl results.jsonl] [--threads 1]

For each family (``rewrite.families.families()``, none picked by hand): build it tiny (hidden 64, 2 layers,
4 heads), count the attention cores the eager model runs, ``convert(model, passes=[])`` at (batch 2, length 8),
then compare with the original at (3, 13), with and without padding. Prints the table and writes it, with the
command that made it and a summary, to ``--out``. ``--jsonl`` appends one line per family as it finishes
(a long run that stops can be resumed with ``--resume``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated families (default: all)")
    ap.add_argument("--limit", type=int, default=0, help="the first N families only")
    ap.add_argument("--out", default="docs/families.md", help="markdown file to write ('' for none)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per family before it counts as 'timeout'")
    ap.add_argument("--jsonl", default="", help="append each result to this file as it finishes")
    ap.add_argument("--resume", action="store_true", help="reuse the results already in --jsonl")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--extended", action="store_true",
                    help="on exact families also gqa{kv_heads=1} and ONNX export with ONNX Runtime parity")
    return ap.parse_args(argv)


def command_line(argv) -> str:
    return "python examples/family_matrix.py" + ("" if not argv else " " + shlex.join(argv))


def _on_alarm(signum, frame):
    from rewrite.families import FamilyTimeout

    raise FamilyTimeout()


def run_one(family: str, timeout: int, extended: bool = False):
    from rewrite.families import FamilyResult, FamilyTimeout, check

    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    try:
        return check(family, extended=extended)
    except FamilyTimeout as e:
        import traceback

        frames = traceback.extract_tb(e.__traceback__)
        where = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1]) if frames else None
        at = f" (in {os.path.basename(where.filename)}:{where.lineno} {where.name})" if where else ""
        return FamilyResult(family, "timeout", error="Timeout", message=f"over {timeout} s{at}",
                            seconds=time.perf_counter() - t0)
    finally:
        signal.alarm(0)


def table(results):
    from rich.table import Table

    from rewrite.families import _fmt

    colour = {"pass": "green", "refused": "yellow", "partial": "yellow", "skipped": "dim"}
    t = Table(title="transformers families, convert(passes=[])")
    for col in ("family", "status", "sites", "max err", "padded err", "s", "reason"):
        t.add_column(col, overflow="fold")
    for r in results:
        c = colour.get(r.status, "red")
        why = f"{r.error}: {r.message}" if r.error else ""
        t.add_row(r.family, f"[{c}]{r.status}[/{c}]", f"{r.sites}/{r.attention}", _fmt(r.max_err),
                  _fmt(r.padded_err), f"{r.seconds:.0f}", why[:160])
    return t


def markdown(results, argv) -> str:
    import transformers

    from rewrite.families import EXACT_TOL, refusal_table, summary_markdown, to_markdown

    return "\n".join([
        "# The family matrix",
        "",
        "Made by (from the repository root, one thread):",
        "",
        "```",
        f"OMP_NUM_THREADS=1 {command_line(argv)}",
        "```",
        "",
        *(["With `--resume`, the results already in the JSONL file (from an earlier run) were kept and only the "
           "missing families run again.", ""] if "--resume" in argv else []),
        f"transformers {transformers.__version__}, torch {torch.__version__}. Every family in transformers' "
        "causal-LM, masked-LM and seq2seq-LM auto mappings, built tiny (hidden 64, 2 layers, 4 heads, "
        "vocabulary 128; `rewrite.families.OVERRIDES` where the defaults do not build), converted with "
        "`rewrite.convert(model, passes=[])` at batch 2, length 8, and compared with the original at batch 3, "
        f"length 13, without and with padding (max abs error / max(1, max |logit|), exact ≤ {EXACT_TOL:g}). "
        "`sites` is recognized sites / attention cores the eager model ran.",
        "",
        "## Summary",
        "",
        summary_markdown(results),
        "",
        "Statuses: **pass** exact both ways; **refused** `convert` raised a `rewrite.errors` class; "
        "**partial** converted, but some cores were not recognized (the first refusal is shown; those cores run "
        "as the model's own code); **inexact** recognized but the round-trip is off (verification or our "
        "comparison); **miscounted** more sites than cores; **crashed** a raw exception from rewrite; "
        "**timeout**; **skipped** the tiny model does not build or does not take token ids.",
        "",
        "## Refusals by cause",
        "",
        "Module and node names left out, so that families refused for the same reason share a row.",
        "",
        refusal_table(results),
        "",
        "## Families",
        "",
        to_markdown(results),
        "",
    ])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rewrite.families import FamilyResult, families

    transformers.logging.set_verbosity_error()
    names = families()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            sys.exit(f"not in transformers' auto mappings: {', '.join(unknown)}")
        names = wanted
    if args.limit:
        names = names[: args.limit]

    done = {}
    if args.resume and args.jsonl and os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            for line in f:
                d = json.loads(line)
                done[d["family"]] = FamilyResult(**d)
    wide = None if sys.stderr.isatty() else 160  # a log file gets whole lines
    console = Console(stderr=True, width=wide)
    results = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[family]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("families", total=len(names), family="")
        for name in names:
            progress.update(task, family=name)
            if name in done:
                res = done[name]
            else:
                res = run_one(name, args.timeout, args.extended)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(res.to_dict()) + "\n")
            results.append(res)
            progress.console.log(f"{name}: {res.status} {res.sites}/{res.attention} "
                                 f"{res.error + ': ' + res.message[:120] if res.error else ''}")
            progress.advance(task)
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(markdown(results, argv))
        console.print(f"wrote {args.out}")
    from rewrite.families import summary_markdown

    out.print(summary_markdown(results), markup=False)
    return results


if __name__ == "__main__":
    main()
