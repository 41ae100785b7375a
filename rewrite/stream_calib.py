"""Calibrated passes streamed layer by layer (the sequential scheme of GPTQ-style quantizers).

The calibration batches are embedded once; then, for each decoder layer i in order, only layer i is read from
the shards (``stream_layers.DecoderLayers``), the hidden states run through it with each calibrated pass's
input attention, the site's inputs are recorded, the pass runs on a graph holding that one site and its
recorded inputs (so its own statistics code gathers what its ``Calibration`` declares), and the outputs
become layer i+1's inputs. The converted tensors of layer i go to the journal; the folder is written from
the shards and the journal at the end (``shards.write_folder``).

Order of operations: pass s reads the hidden states of layers < i *after passes 1..s-1*, the same inputs
it reads in ``rewrite.convert`` (one stream of hidden states per calibrated pass; pass s's stream is run
through layer i as converted by passes 1..s-1), so streamed and in-memory conversion agree to round-off.
A pass deciding across sites (``Calibration.scope == "model"``: dha's head budget, prune-heads' global
ranking) runs in two sweeps: the first ``gather``s each site's numbers (and stops there), ``decide`` uses
them all, the second sweep ``apply``s the decision per site and runs the rest of the pipeline. A sweep runs
a pass's layer forwards only when that pass reads the site's inputs there (``Calibration.reads_inputs``): dha
gathers head counts alone, prune-heads removes its decided heads without them, so each runs one forward a layer.

The layer forwards run in ``compute_dtype`` (fp32, or bf16: about 2.5× faster on a bf16 checkpoint where the
CPU has bf16 matrix units); the recorded site inputs are widened to fp32, so the statistics stay fp32.

Journal (``OUT.partial/.rewrite-journal``): the hidden states (memory-mapped, two sides per stream, so layer
i's inputs survive until layer i is done), the converted layers and ``journal.json`` (the sweep and layer
reached, gathered numbers, decisions), written after every layer (temporary name, then rename). Rerunning
the same conversion resumes after the last completed layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
import types
from typing import Optional

import torch

from .errors import PassError, RewriteError
from .graph import sites
from .pass_base import Diagnostic, PassContext
from .shards import JOURNAL
from .stream_write import save_op
from .stream_layers import DecoderLayers, HiddenStore, LayerInputs, one_site_graph, site_batches

__all__ = ["JOURNAL", "calibration_batches", "convert_layers", "can_stream"]



def can_stream(pipeline: list) -> Optional[str]:
    """None when every calibrated pass declares statistics gathered per layer, else the reason it cannot."""
    for p in pipeline:
        c = p.calibration
        if c is not None and not c.streams:
            return f"'{p.spec()}' cannot stream: {c.why}"
    return None


def calibration_batches(folder: str, calibration_file: str, batch: int = 16, max_length: int = 128,
                        flag: str = "--calibration") -> list:
    """The calibration file (one sample a line) tokenized by the folder's tokenizer, ``batch`` lines a batch;
    errors name the option ``flag`` the file came from."""
    from .models import tokenizer_for

    tok = tokenizer_for(folder)
    if tok is None:
        raise RewriteError(f"{flag} {calibration_file}: {folder} has no tokenizer to tokenize the text with")
    if not os.path.isfile(calibration_file):
        raise RewriteError(f"{flag} {calibration_file}: no such file")
    with open(calibration_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise RewriteError(f"{flag} {calibration_file}: the file holds no text")
    calib = [tok(lines[k:k + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
             for k in range(0, len(lines), batch)]
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in calib]


def _digest(batches: list) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode() + str(tuple(b[k].shape)).encode() + b[k].contiguous().numpy().tobytes())
    return h.hexdigest()


class Journal:
    """``journal.json`` plus the per-layer files of an unfinished conversion."""

    def __init__(self, folder: str, key: dict):
        self.folder = os.path.join(folder, JOURNAL)
        self.path = os.path.join(self.folder, "journal.json")
        state = None
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
            if state.get("key") != key:
                shutil.rmtree(self.folder)  # another conversion's leftovers: start again
                state = None
        os.makedirs(self.folder, exist_ok=True)
        self.resumed = state is not None and (state["sweep"], state["done"]) != (0, 0)
        self.state = state or {"key": key, "sweep": 0, "done": 0, "gathered": {}, "plans": {}, "diags": {},
                               "seconds": []}

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def layer_file(self, i: int, ext: str) -> str:
        return os.path.join(self.folder, f"layer-{i:05d}.{ext}")


def _heads(op) -> dict:
    return {"q_heads": op.q_heads, "k_heads": op.k_heads, "v_heads": op.v_heads, "kv_heads": op.kv_heads}


def convert_layers(ckpt, tpl, pipeline: list, tmp: str, batches: list, bar, tally,
                   dtype: torch.dtype = torch.float32) -> dict:
    """Run ``pipeline`` layer by layer into the journal of ``tmp`` (see the module docstring); returns extras.

    Tests set ``REWRITE_TEST_KILL_AFTER=i`` to have the process SIGKILL itself once layer i of the converting
    sweep is journaled."""
    from . import pipeline as _pipeline
    from .stream import _drop_sites, _load, _release, _rewrite_site, _run

    t0 = time.perf_counter()
    kill_after = os.environ.get("REWRITE_TEST_KILL_AFTER")
    kill_after = int(kill_after) if kill_after else None
    key = {"version": 1, "input": os.path.abspath(ckpt.folder), "pipeline": _pipeline.to_spec(pipeline),
           "calibration": _digest(batches), "compute_dtype": str(dtype)}
    journal = Journal(tmp, key)
    st = journal.state
    resumed_at = {"sweep": st["sweep"] + 1, "layer": st["done"]} if journal.resumed else None
    inputs = LayerInputs(ckpt, tpl, batches)
    layers = DecoderLayers(ckpt, tpl, inputs, dtype)
    shapes = [tuple(h.shape) for h in inputs.hidden]
    calibrated = [s for s, p in enumerate(pipeline, 1) if p.calibration is not None]
    store = _store(shapes, len(calibrated), journal.folder, bar)
    gathers = [s for s in calibrated if pipeline[s - 1].calibration.scope == "model"]
    sweeps = gathers + [None]  # a gathering sweep per cross-site pass, then the converting sweep
    n = tpl.n_layers
    for k, gather_at in enumerate(sweeps):
        if k < st["sweep"]:
            continue
        run = pipeline[:gather_at] if gather_at else pipeline
        streams = [s for s in calibrated if s <= len(run)]
        what = f"gathering {pipeline[gather_at - 1].spec()}" if gather_at else "converting"
        task = bar.add_task(f"{tpl.family}: sweep {k + 1}/{len(sweeps)} ({what})", total=n, completed=st["done"])
        if st["done"] == 0:
            for s in range(len(streams)):
                store.fill(s, inputs.hidden)
        gathered = st["gathered"].setdefault(str(gather_at), []) if gather_at else None
        for i in range(st["done"], n):
            t = time.perf_counter()
            op0 = _load(ckpt, tpl, i)
            weights = None  # read when a layer forward first needs them
            ops, stats, diags, secs, graphs = [op0], [{}], [[]], [0.0], []
            arity = len(tpl.plans[tpl.site_of[i]].inputs)  # the site's (x, kv, mask, *side)
            for s, p in enumerate(run, 1):
                ctx = PassContext()
                if p.calibration is not None and p.calibration.reads_inputs(gathering=s == gather_at):
                    weights = layers.weights(i) if weights is None else weights
                    records = layers.run(i, weights, ops[-1], store, streams.index(s), record=True)
                    ctx = PassContext(calibration=site_batches(records))
                ts = time.perf_counter()
                if s == gather_at:
                    gm = one_site_graph(ops[-1], arity)
                    graphs.append(gm)
                    gathered.append({"data": p.gather(gm, ctx)[0], "heads": _heads(ops[-1]),
                                     "name": ops[-1].info.name})
                    break
                if p.calibration is None:
                    new, st_s, dg = _rewrite_site(p, i, ops[-1], ctx)
                    new = new if new is not None else ops[-1]
                else:
                    gm = one_site_graph(ops[-1], arity)
                    result = (p.apply(gm, ctx, st["plans"][str(s)][i]) if p.calibration.scope == "model"
                              else _run(p, gm, ctx, f"layer {i} ({ops[-1].info.name})"))
                    new, st_s, dg = sites(result.graph)[0], result.stats.get(ops[-1].info.name, {}), result.diagnostics
                    graphs += [gm, result.graph]
                ops.append(new)
                stats.append(st_s)
                diags.append([vars(d) for d in dg])
                secs.append(time.perf_counter() - ts)
            if gather_at is None:
                tally.add(i, tpl.site_of[i], ops)
                save_op(journal.layer_file(i, "op"), ops[-1], ckpt.dtype_of(tpl.layout.fields[i]["wq"]))
                with open(journal.layer_file(i, "json"), "w", encoding="utf-8") as f:
                    json.dump({"rows": [r[-1] for r in tally.rows], "stats": stats, "diags": diags, "seconds": secs}, f)
                for r in tally.rows:
                    r.pop()  # read back below, the same way for resumed and fresh layers
            _drop_sites(*graphs)  # graph modules are reference cycles: without this every layer's ops would stay
            del ops, weights, graphs, ctx
            records = result = gm = None
            _release()
            st["done"] = i + 1
            st["seconds"].append(time.perf_counter() - t)
            st.setdefault("rss", []).append(_rss())
            journal.save()
            bar.advance(task)
            if kill_after is not None and gather_at is None and i == kill_after:
                os.kill(os.getpid(), 9)
        if gather_at is not None:
            p = pipeline[gather_at - 1]
            stubs = [types.SimpleNamespace(**g["heads"], info=types.SimpleNamespace(name=g["name"])) for g in gathered]
            plan, dg = p.decide([g["data"] for g in gathered], stubs)
            st["plans"][str(gather_at)], st["diags"][str(gather_at)] = plan, [vars(d) for d in dg]
        st["sweep"], st["done"] = k + 1, 0
        journal.save()
    for i in range(n):
        with open(journal.layer_file(i, "json"), encoding="utf-8") as f:
            rec = json.load(f)
        for s, row in enumerate(rec["rows"]):
            tally.rows[s].append(row)
            tally.seconds[s] += rec["seconds"][s]
            tally.diags[s] += [Diagnostic(**d) for d in rec["diags"][s]]
            if rec["stats"][s]:
                tally.stats[s][tpl.layout.site_names[i]] = rec["stats"][s]
    for s, dg in st["diags"].items():
        tally.diags[int(s)] += [Diagnostic(**d) for d in dg]
    per_layer = st["seconds"]
    return {"journal": journal, "hidden_state_bytes": HiddenStore.bytes_needed(shapes, len(calibrated)),
            "hidden_states": "memory-mapped files in the journal" if store.folder else "RAM",
            "compute_dtype": str(dtype).replace("torch.", ""), "calibration_tokens": sum(int(torch.Size(s[:-1]).numel()) for s in shapes),
            "sweeps": len(sweeps), "resumed_at": resumed_at,
            "seconds_per_layer": sum(per_layer) / max(len(per_layer), 1), "layer_seconds": per_layer,
            "layer_rss_bytes": st.get("rss", []),
            "peak_rss_bytes": peak_rss(),
            "calibration_seconds": time.perf_counter() - t0}


def _rss() -> int:
    """Resident memory now (bytes; Linux /proc, else the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """This process's peak resident memory so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _store(shapes: list, streams: int, folder: str, bar) -> HiddenStore:
    """The hidden states on disk (memory-mapped) when they fit there, else in RAM, else refused."""
    from .stream import available_memory

    need = HiddenStore.bytes_needed(shapes, streams)
    tokens = sum(int(torch.Size(s[:-1]).numel()) for s in shapes)
    disk = shutil.disk_usage(folder).free
    ram = available_memory()
    on_disk = disk > need + (1 << 28) or all(os.path.exists(os.path.join(folder, f"hidden-{s}-{side}.f32"))
                                             for s in range(streams) for side in (0, 1))
    where = "memory-mapped in " + folder if on_disk else "in RAM (no room on disk: not resumable)"
    if not on_disk and ram is not None and ram < need + (1 << 30):
        raise PassError(f"the calibration hidden states ({tokens} tokens × {shapes[0][-1]} wide, fp32, two copies "
                        f"for each of {streams} calibrated pass(es)) need {need / 2**30:.2f} GiB; {disk / 2**30:.2f} "
                        f"GiB of disk at {folder} and {ram / 2**30:.2f} GiB of RAM are free. Refused: give fewer or "
                        "shorter calibration samples, or free disk")
    bar.console.print(f"calibration hidden states: {need / 2**20:.1f} MiB ({tokens} tokens, {streams} stream(s)), "
                      f"{where}")
    return HiddenStore(shapes, streams, folder if on_disk else None)
