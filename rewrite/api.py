"""Public API: ``convert``, ``inspect``, ``load`` and the ``Converted`` module."""
from __future__ import annotations

import copy
import dataclasses
import inspect as _inspect
import json
import time
from typing import Optional

import torch
from torch import fx, nn

from . import pipeline as _pipeline
from .capture import Captured, capture, flat_inputs, normalize_inputs, resize_inputs, scramble_inputs
from .errors import CaptureError, NoAttentionError, PassError, RewriteError, VerificationError
from .graph import count_params, eliminate_dead_code, install, sites
from .pass_base import PassContext, run_pass
from .recognize import find_sites, mark_causal_masks, run_with_env
from .report import Report, Stage
from .score_mods import describe
from .verify import compare_outputs, first_divergence, site_errors

__all__ = ["convert", "restage", "inspect", "load", "Converted", "SiteSummary", "canonicalize"]

EXACT_TOL = 1e-5  # relative to the output's scale


@dataclasses.dataclass
class SiteSummary:
    """One attention site as ``rewrite.inspect`` lists it."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    layout: str
    rope: Optional[str]
    causal: bool
    masked: bool
    transform: str
    scores: str = ""  # score modifiers (rewrite.score_mods.describe): per-head bias, soft-cap

    def __str__(self):
        extra = f", rope={self.rope}" if self.rope else ""
        return (f"{self.name}: {self.q_heads} q heads, {self.kv_heads} kv heads, head size {self.head_dim}"
                f"{extra}{', causal' if self.causal else ''}{', masked' if self.masked else ''}"
                + (f", {self.scores}" if self.scores else ""))


@dataclasses.dataclass
class Inspection:
    sites: list
    refusals: list

    def __str__(self):
        lines = [str(s) for s in self.sites] + [f"NOT RECOGNIZED {r}" for r in self.refusals]
        return "\n".join(lines)

    def __len__(self):
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)


def _progress():
    """A rich progress wrapper ``track(iterable, description)``; quiet when not a terminal."""
    from rich.progress import track

    def wrap(iterable, description):
        return track(iterable, description=description, transient=True)

    return wrap


def prune_dead_code(gm: fx.GraphModule) -> None:
    """Drop pure computations nobody reads (e.g. MHA's averaged weights when the caller discards them)."""
    eliminate_dead_code(gm)
    gm.recompile()


def canonicalize(cap: Captured, check_shapes: bool = True):
    """Replace every recognized attention region of the captured graph by a canonical op (in place)."""
    prune_dead_code(cap.gm)
    env = run_with_env(cap.gm, flat_inputs(cap, cap.kwargs))
    probe_env = run_with_env(cap.gm, flat_inputs(cap, resize_inputs(cap, cap.kwargs))) \
        if check_shapes and cap.symbol_sizes else None
    matches, refusals = find_sites(cap.gm, env, probe_env)
    if any(m.masks and m.kv is None for m in matches):
        try:  # values the model may not accept (a 0/1 input used as an index): no site is marked causal
            scrambled = run_with_env(cap.gm, flat_inputs(cap, scramble_inputs(resize_inputs(cap, cap.kwargs))))
        except Exception:  # noqa: BLE001 - marking is an optimization, never a reason to fail
            scrambled = None
        if scrambled is not None:
            mark_causal_masks(matches, [env, probe_env, scrambled])
        del scrambled
    del env, probe_env
    if not matches:
        why = "; ".join(str(r) for r in refusals)
        raise NoAttentionError(
            "no attention found in the model" + (f": {why}" if why else
                                                  " (no scaled_dot_product_attention or softmax(q·kᵀ)·v in its graph)")
            + ". Fix: pass a transformer, or see rewrite.inspect for the sites that could not be recognized.")
    install(cap.gm, matches)
    return cap.gm, refusals


def inspect(model: nn.Module, example_inputs) -> Inspection:
    """The attention sites found in ``model``, with their shapes, and those that could not be read."""
    cap = capture(model, example_inputs)
    prune_dead_code(cap.gm)
    env = run_with_env(cap.gm, flat_inputs(cap, cap.kwargs))
    matches, refusals = find_sites(cap.gm, env, None)
    out = []
    for m in matches:
        op = m.op
        out.append(SiteSummary(m.name, op.q_heads, op.kv_heads, op.head_dim, op.info.layout, op.info.rope,
                               op.causal, bool(m.masks),
                               ", ".join(t.description for t in (op.q_transform, op.k_transform, op.v_transform) if t),
                               describe(op)))
    return Inspection(out, refusals)


def _stage(name, spec, exact, gm, changed, seconds, cmp, errs, dtype_bytes, diags=(), stats=None):
    ops = sites(gm)
    names = [op.info.name for op in ops]
    return Stage(
        name=name, spec=spec, exact=exact, sites_changed=changed, params=count_params(gm),
        q_heads=[op.q_heads for op in ops], kv_heads=[op.kv_heads for op in ops],
        kv_cache_bytes_per_token=sum(op.kv_cache_bytes_per_token(dtype_bytes) for op in ops if not op.info.cross),
        attn_flops=sum(op.attn_flops() for op in ops), max_abs_err=cmp.max_abs_err, cosine=cmp.cosine,
        seconds=seconds, site_names=names, site_errors=errs, diagnostics=[str(d) for d in diags],
        stats=stats or {}, state_bytes=sum(op.state_bytes() for op in ops if not op.info.cross))


def convert(model: nn.Module, passes=None, example_inputs=None, calibration=None, backend: str = "eager",
            verify: bool = True, progress: bool = True, dynamic_shapes=None) -> "Converted":
    """Capture ``model``, canonicalize its attention, run ``passes`` and lower to ``backend``.

    Args:
        model: the PyTorch model; never mutated.
        passes: a spec string (``"gqa{kv_heads=2},gated-attention"``), or a list of strings/Pass objects.
        example_inputs: a tuple of positional args or a dict of kwargs for ``model``.
        calibration: optional iterable of input batches (tuples or dicts, like example_inputs).
        backend: "eager" | "triton" | "onnxruntime".
    Returns:
        a ``Converted`` nn.Module with ``.report``.
    """
    if example_inputs is None:
        raise RewriteError("convert needs example_inputs: a tuple of args or a dict of kwargs for the model")
    pipeline = _pipeline.parse(passes)
    spec = _pipeline.to_spec(pipeline)
    track = _progress() if progress else None
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    gm, refusals = canonicalize(cap)
    capture_s = time.perf_counter() - t0
    calib = [normalize_inputs(model, b) for b in calibration] if calibration is not None else None
    calib = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in calib] if calib else None
    for i, b in enumerate(calib or []):
        if sorted(b) != sorted(cap.kwargs):
            raise RewriteError(f"calibration batch {i} gives the inputs {sorted(b)}, but the model was captured with "
                               f"{sorted(cap.kwargs)}; give every calibration batch the same inputs as example_inputs")
    check = [cap.kwargs, resize_inputs(cap, cap.kwargs, grow=2)] if cap.symbol_sizes else [cap.kwargs]
    check += (calib or [])[:2]  # and on real data when there is some
    dtype_bytes = next(iter(model.parameters())).element_size() if any(True for _ in model.parameters()) else 4

    def call_model(kw):
        return model(**kw, **cap.fixed)

    def caller(g):
        return lambda kw: g(**kw, **cap.fixed)

    with torch.no_grad():
        cmp0 = compare_outputs(call_model, caller(gm), check) if verify else _nan_cmp()
    report = Report(pipeline=spec, model=type(model).__name__, backend=backend,
                    refusals=[str(r) for r in refusals])
    report.stages.append(_stage("captured", "", True, gm, 0, capture_s, cmp0, [0.0] * len(sites(gm)), dtype_bytes))
    if verify and not cmp0.relative <= EXACT_TOL:
        raise VerificationError(f"capture is not exact: max abs error {cmp0.max_abs_err:.3g} at output scale "
                                f"{cmp0.scale:.3g}; please report this model")
    ctx = PassContext(calibration=calib, captured=cap, progress=track)
    done = []
    current = gm
    graphs = [gm]  # one model per report stage (they share every unchanged site), for rewrite.evaluate
    for p in pipeline:
        if p.needs_calibration and not calib:
            raise PassError(f"pass '{p.spec()}' needs calibration data; pass calibration=[batches, ...] "
                            "(CLI: --calibration FILE)")
        t = time.perf_counter()
        result = _run_pass(p, current, ctx, done)
        seconds = time.perf_counter() - t
        new = result.graph
        cmp = compare_outputs(call_model, caller(new), check) if verify else _nan_cmp()
        errs = site_errors(gm, caller(gm), new, check[:1]) if verify else []  # vs the original, per site
        stage = _stage(p.name, p.spec(), p.exact, new, _changed(current, new), seconds, cmp, errs, dtype_bytes,
                       result.diagnostics, result.stats)
        report.stages.append(stage)
        if verify and p.exact:  # an exact pass must leave the previous stage's outputs unchanged
            step = compare_outputs(caller(current), caller(new), check)
            if not step.relative <= EXACT_TOL:
                step_errs = site_errors(current, caller(current), new, check[:1])
                stage.first_divergence = first_divergence(stage.site_names, step_errs,
                                                          EXACT_TOL * max(step.scale, 1.0))
                raise VerificationError(
                    f"pass '{p.spec()}' claims to be exact but changes the previous stage's outputs: max abs error "
                    f"{step.max_abs_err:.3g}; first diverging site: {stage.first_divergence}")
        done.append(p)
        current = new
        graphs.append(new)
    conv = Converted(current, cap, report, model, stage_graphs=graphs)
    if backend != "eager":
        from rewrite.backends import lower

        conv = lower(conv, backend)
    return conv


def _run_pass(p, gm, ctx, done: list):
    return run_pass(p, gm, ctx, f"after the following passes: {[d.spec() for d in done]}")


def restage(conv: "Converted", passes, calibration=None) -> "Converted":
    """A new ``Converted`` running ``passes`` on the captured graph of ``conv``, without a second capture.

    One capture then serves many pipelines (a perplexity table). Stages are not verified: their ``max_abs_err``
    and ``cosine`` are NaN; ``rewrite.evaluate`` measures them. ``calibration`` is a list of kwargs dicts.
    """
    cap, source = conv._captured, conv.__dict__.get("_source")
    report = Report(pipeline=_pipeline.to_spec(_pipeline.parse(passes)), model=conv.report.model,
                    backend="eager", refusals=list(conv.report.refusals),
                    stages=[copy.deepcopy(conv.report.stages[0])])
    ctx = PassContext(calibration=calibration, captured=cap)
    dtype_bytes = next(iter(source.parameters())).element_size() if source is not None else 4
    current, graphs, done = cap.gm, [cap.gm], []
    for p in _pipeline.parse(passes):
        if p.needs_calibration and not calibration:
            raise PassError(f"pass '{p.spec()}' needs calibration data; pass calibration=[batches, ...]")
        t = time.perf_counter()
        result = _run_pass(p, current, ctx, done)
        done.append(p)
        report.stages.append(_stage(p.name, p.spec(), p.exact, result.graph, _changed(current, result.graph),
                                    time.perf_counter() - t, _nan_cmp(), [], dtype_bytes, result.diagnostics,
                                    result.stats))
        current = result.graph
        graphs.append(current)
    return Converted(current, cap, report, source, stage_graphs=graphs)


def _nan_cmp():
    from .verify import Comparison

    return Comparison(float("nan"), float("nan"), float("nan"))


def _changed(old: fx.GraphModule, new: fx.GraphModule) -> int:
    a, b = sites(old), sites(new)
    return sum(1 for x, y in zip(a, b) if x is not y)


class Converted(nn.Module):
    """The converted model: call it like the original; ``.report`` says what changed."""

    def __init__(self, gm: fx.GraphModule, cap: Captured, report: Report, model: Optional[nn.Module] = None,
                 stage_graphs: Optional[list] = None):
        super().__init__()
        self.gm = gm
        self.fixed = dict(cap.fixed)
        self.input_names = list(cap.kwargs)
        self.example_inputs = dict(cap.kwargs)
        self.dim_symbols = cap.dim_symbols
        self.report = report
        self._signature = _inspect.signature(model.forward) if model is not None else None
        self._captured = cap
        self.__dict__["_source"] = model  # the caller's model, read (never changed) by to_transformers
        self.__dict__["_hf"] = None
        self.__dict__["_stage_graphs"] = stage_graphs  # not submodules: they share the final graph's weights

    @property
    def sites(self) -> list:
        return sites(self.gm)

    def bind(self, args, kwargs) -> dict:
        if self._signature is not None:
            bound = self._signature.bind_partial(*args, **kwargs)
            kw = {k: v for k, v in bound.arguments.items()}
        else:
            if args:
                kw = dict(zip(self.input_names, args))
                kw.update(kwargs)
            else:
                kw = dict(kwargs)
        kw = {k: v for k, v in kw.items() if k in self.input_names or k not in self.fixed}
        missing = [n for n in self.input_names if n not in kw]
        extra = [n for n in kw if n not in self.input_names]
        if missing or extra:
            raise RewriteError(f"this model was captured with inputs {self.input_names}; call it with the same "
                               f"inputs (missing: {missing}, unexpected: {extra})")
        return kw

    def forward(self, *args, **kwargs):
        try:
            return self.gm(**self.bind(args, kwargs), **self.fixed)
        except AssertionError as e:
            if not str(e).startswith("Guard failed"):
                raise
            raise CaptureError(
                f"the captured graph only runs at some input sizes: {e} (torch.export fixed that size from the "
                "example inputs because the model's code branches on it). Fix: call it at the traced size, or "
                "convert with example_inputs of the size you run") from None

    # ---- generation ----------------------------------------------------------------------------
    def to_transformers(self):
        """A ``transformers.PreTrainedModel`` of the source family whose attention modules run this model's
        canonical ops (the weights are shared): HF caches, ``generate``, ``Trainer`` and ``peft`` work on it."""
        from .hf_adapter import to_transformers

        return to_transformers(self)

    def hf_model(self):
        """The ``to_transformers()`` view of this model, built once and kept."""
        if self.__dict__.get("_hf") is None:
            self.__dict__["_hf"] = self.to_transformers()
        return self.__dict__["_hf"]

    def generate(self, input_ids, attention_mask=None, **generate_kwargs):
        """As ``transformers`` ``generate`` (greedy, sampling, beam search, ``max_new_tokens``, left padding),
        with a KV cache at the converted head counts (a fixed-size state for linear attention)."""
        from .hf_adapter import GenerationError, source_model

        model = source_model(self, "generate")
        if not model.can_generate():
            raise GenerationError(f"generate needs a language-model head; {type(model).__name__} is an "
                                  "encoder-only or base model that cannot generate. Convert its *ForCausalLM "
                                  "class instead")
        hf = self.hf_model()
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask
        with torch.no_grad():
            return hf.generate(input_ids=input_ids, **generate_kwargs)

    # ---- deployment ----------------------------------------------------------------------------
    def save_pretrained(self, path: str, stock: bool = True) -> dict:
        """A Hugging Face folder: the family's stock form where its config can express the result, else a
        custom-code folder (``auto_map``) that reloads with ``trust_remote_code=True``. Returns what was
        written: ``{"kind": "stock" | "custom", "reason": why not stock, ...}``."""
        from .hf_save import save_pretrained

        return save_pretrained(self, path, stock=stock)

    def export_onnx(self, path: str, opset: int = 23, check: bool = True, decoder: bool = False, **kwargs):
        """The ONNX file at ``path`` (``backends/onnx.py``); with ``decoder=True`` a folder ``path`` holding one
        decode graph with past KV at the converted head counts (``backends/onnx_decoder.py``), which
        ``rewrite.load_onnx_decoder(path)`` generates from."""
        if decoder:
            from rewrite.backends.onnx_decoder import export_decoder
            from rewrite.hf_adapter import GenerationError

            for op in self.sites:
                if getattr(op.score_fn, "windowed", False):
                    raise GenerationError(
                        f"{op.info.name}: lit window={op.score_fn.window} (sliding-window softmax + linear state) "
                        "has no ONNX decoder lowering (its past is the last W keys/values plus the linear state); export the "
                        "graph without decoder=True, or decode with conv.generate")
            return export_decoder(self, path, opset=opset, check=check, **kwargs)
        from rewrite.backends.onnx import export_onnx

        return export_onnx(self, path, opset=opset, check=check, **kwargs)

    def exported_program(self):
        from torch.export import Dim

        kw = {**self.example_inputs, **self.fixed}
        dyn = {k: ({d: Dim.AUTO for d in self.dim_symbols.get(k, {})} if isinstance(v, torch.Tensor) else None)
               for k, v in kw.items()}

        with torch.no_grad():
            return torch.export.export(self.gm, (), kw, dynamic_shapes=dyn, strict=False)

    def save(self, path: str) -> None:
        """A self-contained ``.pt2``: the converted graph, its weights and the report."""
        ep = self.exported_program()
        meta = {"report": self.report.to_json(), "fixed": _jsonable(self.fixed), "inputs": self.input_names}
        torch.export.save(ep, path, extra_files={"rewrite.json": json.dumps(meta)})


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (bool, int, float, str, type(None)))}


class Loaded(nn.Module):
    """A model loaded from ``Converted.save``: needs neither the original code nor rewrite's classes."""

    def __init__(self, ep, meta: dict):
        super().__init__()
        self.module_ = ep.module()
        self.fixed = meta.get("fixed", {})
        self.input_names = meta.get("inputs", [])
        self.report = Report.from_json(meta["report"])

    def forward(self, *args, **kwargs):
        kw = dict(zip(self.input_names, args))
        kw.update(kwargs)
        return self.module_(**kw, **self.fixed)


def load(path: str) -> Loaded:
    extra = {"rewrite.json": ""}
    ep = torch.export.load(path, extra_files=extra)
    return Loaded(ep, json.loads(extra["rewrite.json"]))
