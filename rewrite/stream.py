"""Convert a (sharded) Hugging Face checkpoint layer by layer, with bounded memory.

    report = convert_folder("Llama-2-7b", "gqa{kv_heads=8}", "out")   # CLI: rewrite convert DIR --out OUT

How much of the model a pipeline needs at once decides how it runs (the report's extras say which):

1. ``site`` -- every pass is site-local (a SitePass or in ``SITE_LOCAL``) and needs no calibration: streamed.
   For layer i only its attention tensors are read (``shards.Checkpoint.load``), put into the template's op
   (``hf_checkpoint``), rewritten pass by pass (``rewrite_site(i, op, ctx)``; a site-local pass without it
   runs on a graph holding that one site) and written back. Every other tensor is copied byte for byte in
   chunks (``shards.write_folder``). Peak memory: the template and one layer's attention (plus a layer
   whose tensors straddle two shards), whatever the model's or the shards' size.
2. ``attention`` -- a plain Pass (whole model) needing no calibration (prune-heads, masa): the attention
   weights of every layer are loaded (fp32) into a graph holding only the sites; the rest streams as above.
3. ``layers`` -- passes need calibration and declare per-site statistics (``Pass.calibration``): the
   calibration hidden states run through the decoder layers one at a time (``stream_calib.py``), with a
   journal, so an interrupted conversion resumes at its last completed layer.
4. ``model`` -- a calibrated pass that cannot stream (taylor importance, masa refinement), or a pipeline
   mixing tiers 2 and 3: the whole model is loaded in fp32 and ``rewrite.convert`` runs on the calibration
   data. Tiers 2 and 4 warn, and are refused (with the reason the pass cannot stream) when they do not fit.

Every tier writes ``OUT.partial`` and renames it to ``OUT`` when complete, with the completion mark
``shards.COMPLETE``; a folder holding a journal and no mark is refused as input.

Errors in tiers 1-2 are per site (``site_tally.py``), not whole-model output errors (tier 3 has those).
Refusals (no config.json, a missing shard, fused qkv, non-uniform heads, ...) are listed in ``shards.py``
and ``hf_checkpoint.py``; nothing is left in the output folder after one.
"""
from __future__ import annotations

import ctypes
import gc
import os
import shutil
import time
import warnings
from typing import Optional

import torch
from torch import fx

from . import pipeline as _pipeline
from .errors import PassError, RewriteError
from .graph import SITES, sites
from .heads import rebuild
from .hf_checkpoint import HFLayout, SiteTemplate, Writeback
from .pass_base import PassContext, SitePass, run_pass
from .report import Report
from .shards import Checkpoint, publish, write_folder
from .stream_write import load_op, write_output
from .site_tally import FLOP_TOKENS, SiteTally, streaming_extras

__all__ = ["convert_folder", "tier_of", "site_graph"]

TIERS = ("site", "attention", "layers", "model")
# plain Passes whose result on a site depends only on that site and the options (without calibration);
# a pass may say so itself with a ``site_local`` attribute, which wins over this table
SITE_LOCAL = ("gqa", "mqa")


def tier_of(p) -> str:
    """How much of the model pass ``p`` needs at once: "site" | "attention" | "layers" | "model"."""
    if p.calibration is not None:
        return "layers" if p.calibration.streams else "model"
    local = getattr(p, "site_local", None)
    if local is None:
        local = isinstance(p, SitePass) or p.name in SITE_LOCAL
    return "site" if local else "attention"


def site_graph(ops: list) -> fx.GraphModule:
    """A graph module holding only ``ops`` as its sites (its graph is x -> x): enough for weight-only passes."""
    g = fx.Graph()
    g.output(g.placeholder("x"))
    gm = fx.GraphModule(torch.nn.Module(), g)
    holder = torch.nn.Module()
    for k, op in enumerate(ops):
        holder.add_module(str(k), op)
    setattr(gm, SITES, holder)
    return gm


def _run(p, gm, ctx, where: str):
    return run_pass(p, gm, ctx, f"on {where}")


def _rewrite_site(p, i: int, op, ctx):
    """(new op or None, stats, diagnostics) of a site-local pass on layer i."""
    if getattr(type(p), "rewrite_site", SitePass.rewrite_site) is not SitePass.rewrite_site:
        try:
            return p.rewrite_site(i, op, ctx)
        except RewriteError:
            raise
        except Exception as e:
            raise PassError(f"an error occurred when running the '{p.spec()}' pass on layer {i} ({op.info.name}): "
                            f"{type(e).__name__}: {e}") from e
    gm = site_graph([op])
    result = _run(p, gm, ctx, f"layer {i} ({op.info.name})")
    new = sites(result.graph)[0]
    _drop_sites(gm, result.graph)
    return (new if new is not op else None), result.stats.get(op.info.name, {}), result.diagnostics


def _drop_sites(*graphs) -> None:
    """fx graph modules are reference cycles, freed only when the cyclic GC runs: drop their sites now."""
    for gm in graphs:
        if hasattr(gm, SITES):
            delattr(gm, SITES)


def _release() -> None:
    """Return freed memory to the OS after a layer (cycles; glibc keeps freed heap memory otherwise)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def available_memory() -> Optional[int]:
    """MemAvailable in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _fits(why: str, need: int, what: str) -> None:
    avail = available_memory()
    if avail is not None and need > avail:
        raise PassError(f"{why}: {what} need about {need / 2**30:.1f} GiB and {avail / 2**30:.1f} GiB are "
                        "available. Refused: drop that pass, or convert on a machine with more memory")
    warnings.warn(f"{why}; converting in memory ({what}: about {need / 2**30:.1f} GiB)", RuntimeWarning,
                  stacklevel=4)


def pipeline_tier(pipeline: list) -> str:
    """The tier of a whole pipeline: its largest, and "model" when it mixes "attention" and "layers"."""
    tiers = {tier_of(p) for p in pipeline}
    if {"attention", "layers"} <= tiers:
        return "model"
    return max(tiers, key=TIERS.index, default="site")


def convert_folder(model_dir: str, passes_spec, out_dir: str, calibration_file: Optional[str] = None,
                   progress: bool = True, calibration: Optional[list] = None, compute_dtype=torch.float32) -> Report:
    """Convert the Hugging Face folder ``model_dir`` into ``out_dir`` (see the module docstring).

    Args:
        model_dir: folder with config.json and model.safetensors, or shards and model.safetensors.index.json.
        passes_spec: pipeline spec string or list of passes.
        out_dir: output folder (created); must differ from ``model_dir``.
        calibration_file: text, one sample per line, for passes that need calibration (tiers "layers", "model").
        calibration: instead of the file, a list of batches (dicts with input_ids and attention_mask).
        compute_dtype: dtype of the decoder-layer forwards that make the calibration hidden states (tier
            "layers"): fp32 (as ``rewrite.convert``), or bf16, which runs a bf16 checkpoint's layers about
            2.5× faster on CPUs with bf16 matrix units. The passes' statistics are fp32 either way.
    Returns:
        the Report: one stage for the original and one per pass; ``extras["streaming"]`` says how it ran.
    """
    t0 = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise RewriteError(f"--out {out_dir} is the input folder; choose another folder")
    pipeline = _pipeline.parse(passes_spec)
    for p in pipeline:
        p.check_options()
    dtype = _dtype(compute_dtype)
    tier = pipeline_tier(pipeline)
    first = next((p for p in pipeline if tier_of(p) == tier), pipeline[0] if pipeline else None)
    needs = next((p for p in pipeline if p.calibration is not None), None)
    if needs is not None and not (calibration_file or calibration):
        raise PassError(f"pass '{needs.spec()}' needs calibration data: --calibration FILE (one sample a line)")
    if needs is not None and calibration is None:
        from .stream_calib import calibration_batches

        calibration = calibration_batches(ckpt.folder, calibration_file)
    tmp = out_dir.rstrip("/") + ".partial"
    if tier == "model":
        from .stream_calib import can_stream

        why = can_stream(pipeline) or "the pipeline mixes a whole-model pass without calibration and calibrated ones"
        _fits(f"{first.name} needs calibration statistics ({why})", ckpt.numel() * 4 * 3,
              "the fp32 model and its copies")
        report = _whole_model(ckpt, pipeline, tmp, calibration, progress,
                              f"model in memory: {first.spec()} needs calibration statistics ({why})", t0)
        return _finished(tmp, out_dir, report)
    try:
        report = _convert(ckpt, pipeline, tmp, tier, first, calibration, progress, t0, bool(calibration_file), dtype)
    except BaseException:
        if tier != "layers":  # the layers tier keeps its journal, to resume
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finished(tmp, out_dir, report)


def _finished(tmp: str, out_dir: str, report: Report) -> Report:
    """Mark ``tmp`` complete (its journal gone) and rename it to ``out_dir``."""
    publish(tmp, out_dir, {"pipeline": report.pipeline, "mode": report.extras["streaming"]["mode"]})
    report.extras["streaming"]["output"] = out_dir
    return report


def _dtype(name) -> torch.dtype:
    """torch.float32 / torch.bfloat16 from a dtype or its name ("fp32", "float32", "bf16", "bfloat16")."""
    if isinstance(name, torch.dtype) and name in (torch.float32, torch.bfloat16):
        return name
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if str(name).replace("torch.", "") not in names:
        raise RewriteError(f"compute dtype {name!r}: use fp32 or bf16")
    return names[str(name).replace("torch.", "")]


def _convert(ckpt, pipeline, out_dir, tier, first, calibration, progress, t0, file_given, dtype) -> Report:
    """Tiers site, attention and layers, into ``out_dir``."""
    tpl = SiteTemplate(ckpt)
    layout = tpl.layout
    finish = Writeback(ckpt, tpl.cfg, layout, tpl.own_names)
    tally = SiteTally(pipeline, tpl.args, ckpt.dtype.itemsize)
    ctx = PassContext()
    setup = time.perf_counter() - t0
    with _progress(progress) as bar:
        if tier == "layers":
            from .stream_calib import convert_layers

            extras = convert_layers(ckpt, tpl, pipeline, out_dir, calibration, bar, tally, dtype)
            journal = extras.pop("journal")
            why = f"{len(pipeline)} pass(es), {extras['sweeps']} sweep(s)"
            written = write_output(ckpt, tpl, finish, out_dir, lambda i: load_op(journal.layer_file(i, "op")),
                                   _pipeline.to_spec(pipeline))
            sizes = written["sizes"]
            extras.update(folder=written["kind"], custom_reason=written["reason"])
        elif tier == "attention":
            why = f"{first.name} needs every layer at once"
            _probe(pipeline, tpl.ops[0])
            numel = sum(int(torch.tensor(ckpt.entry(n)["shape"]).prod()) for n in layout.layer_of())
            _fits(why, numel * 4 * (2 + len(pipeline)) + 2**30, "the attention weights of every layer (fp32)")
            task = bar.add_task(f"{tpl.family}: reading attention", total=tpl.n_layers)
            original = []
            for i in range(tpl.n_layers):
                original.append(_load(ckpt, tpl, i))
                bar.advance(task)
            stage_ops, graphs = [original], [site_graph(original)]
            for s, p in enumerate(pipeline, 1):
                t = time.perf_counter()
                result = _run(p, graphs[-1], ctx, "the attention of every layer")
                tally.seconds[s] = time.perf_counter() - t
                tally.diags[s], tally.stats[s] = result.diagnostics, result.stats
                graphs.append(result.graph)
                stage_ops.append(sites(result.graph))
            _drop_sites(*graphs)
            HFLayout.normalize(stage_ops[-1][0], original[0].scale)  # refuse before any more work
            for i in range(tpl.n_layers):
                tally.add(i, tpl.site_of[i], [ops[i] for ops in stage_ops])
            final = stage_ops[-1]
            del stage_ops, graphs, result
            _release()
            task = bar.add_task(f"{tpl.family}: writing", total=tpl.n_layers)

            def compute(i: int) -> dict:
                bar.advance(task)
                op, scale = final[i], original[i].scale
                final[i] = original[i] = None  # written: no longer needed
                tensors = finish(i, op, scale, ckpt.dtype_of(layout.fields[i]["wq"]))
                del op
                _release()
                return tensors
        else:
            task = bar.add_task(f"{tpl.family}: {tpl.n_layers} layers", total=tpl.n_layers)

            def compute(i: int) -> dict:
                ops = [_load(ckpt, tpl, i)]
                for s, p in enumerate(pipeline, 1):
                    t = time.perf_counter()
                    new, st, dg = _rewrite_site(p, i, ops[-1], ctx)
                    tally.seconds[s] += time.perf_counter() - t
                    tally.diags[s] += dg
                    if st:
                        tally.stats[s][ops[0].info.name] = st
                    ops.append(new if new is not None else ops[-1])
                tally.add(i, tpl.site_of[i], ops)
                bar.advance(task)
                tensors = finish(i, ops[-1], ops[0].scale, ckpt.dtype_of(layout.fields[i]["wq"]))
                del ops
                _release()
                return tensors

        if tier != "layers":
            sizes = write_folder(ckpt, out_dir, layout.layer_of(), compute)
            finish.write_config(out_dir)
    report = Report(pipeline=_pipeline.to_spec(pipeline), model=tpl.family, backend="checkpoint")
    report.stages = tally.stages(ckpt.numel(), layout.site_names)
    report.stages[0].seconds = setup
    mode = ("streamed layer by layer" if tier == "site" else f"attention of every layer in memory: {why}"
            if tier == "attention" else f"calibrated, streamed layer by layer: {why}")
    report.extras["streaming"] = streaming_extras(mode, ckpt, out_dir, sizes, finish, time.perf_counter() - t0)
    report.extras["streaming"].update(
        errors="max abs error and cosine are per attention site on the template's random-weight attention inputs, "
               "not whole-model outputs", attn_flops=f"one sequence of {FLOP_TOKENS} tokens",
        calibration="not used: no pass needs it" if file_given and tier != "layers" else None)
    if tier == "layers":
        report.extras["streaming"].update(extras)
    return report


def _probe(pipeline: list, template) -> None:
    """Run the pipeline on two copies of the template site (random weights): if that works and its result has
    no Hugging Face form (shared atoms, gates), refuse before loading every layer. Other failures say nothing
    about the real model (e.g. an option naming layer 5) and are ignored."""
    try:
        gm = site_graph([template, rebuild(template)])
        for p in pipeline:
            gm = p.run(gm, PassContext()).graph
    except Exception:  # noqa: BLE001 - inconclusive on a two-site stand-in
        return
    HFLayout.normalize(sites(gm)[0], template.scale)


def _load(ckpt: Checkpoint, tpl: SiteTemplate, i: int):
    """Layer i's attention as the template's op, fp32."""
    fields = tpl.layout.fields[i]
    raw = ckpt.load(list(fields.values()))
    op = HFLayout.to_op(tpl.ops[tpl.site_of[i]], {f: raw[n] for f, n in fields.items()})
    op.info.name = tpl.layout.site_names[i]
    return op


def _whole_model(ckpt: Checkpoint, pipeline: list, out_dir: str, calib: list, progress: bool, mode: str,
                 t0: float) -> Report:
    """Tier "model": load the whole model in fp32, ``rewrite.convert`` it, write its sites back."""
    import transformers

    from .api import convert

    cfg = transformers.AutoConfig.from_pretrained(ckpt.folder)
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(ckpt.folder, dtype=torch.float32).eval()
    conv = convert(model, pipeline, example_inputs=calib[0], calibration=calib, progress=progress)
    after = conv.sites
    del model
    tpl = SiteTemplate(ckpt)  # the same layout, plans and writer as the streamed tiers
    if [op.info.name for op in after] != tpl.layout.site_names:
        raise RewriteError(f"{arch}: the sites of the whole model ({len(after)}) are not one per layer as in its "
                           "one-layer template; convert it with rewrite.convert and save_pretrained instead")
    finish = Writeback(ckpt, tpl.cfg, tpl.layout, tpl.own_names)
    written = write_output(ckpt, tpl, finish, out_dir, lambda i: after[i], conv.report.pipeline)
    conv.report.backend = "checkpoint"
    conv.report.extras["streaming"] = streaming_extras(mode, ckpt, out_dir, written["sizes"], finish,
                                                       time.perf_counter() - t0)
    conv.report.extras["streaming"].update(folder=written["kind"], custom_reason=written["reason"])
    return conv.report
