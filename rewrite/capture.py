"""Capture: nn.Module + example inputs -> torch.fx.GraphModule with dynamic batch/sequence dims.

``torch.export`` (non-strict) first; ``torch.fx.symbolic_trace`` as a fallback for plain modules.
Hugging Face models are exported without their KV cache (``use_cache=False``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import operator
import re
import traceback
import warnings
from typing import Any

import torch
from torch import fx
from torch.export import Dim

from .errors import CaptureError

__all__ = ["Captured", "capture", "normalize_inputs", "resize_inputs", "flat_inputs", "scramble_inputs"]
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Captured:
    """A captured model: the graph, how to call it, and which input dims are dynamic."""

    gm: fx.GraphModule
    kwargs: dict  # example inputs, all by name
    fixed: dict  # non-tensor kwargs added or kept at capture time (use_cache=False, ...)
    method: str  # "export" | "symbolic_trace"
    symbol_sizes: dict  # str(symbol) -> size in the example
    symbol_ranges: dict  # str(symbol) -> (lo, hi)
    dim_symbols: dict  # input name -> {dim: symbol name}

    def call(self, kwargs: dict):
        return self.gm(**{**kwargs, **self.fixed})


def normalize_inputs(model: torch.nn.Module, example_inputs) -> dict:
    """Bind a tuple of args or a dict of kwargs to the forward signature's names."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    sig = inspect.signature(model.forward)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"example_inputs do not fit {type(model).__name__}.forward{sig}: {e}") from None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise CaptureError(f"{type(model).__name__}.forward takes *{name}; pass example inputs by name")
        else:
            out[name] = value
    if "use_cache" in sig.parameters and "use_cache" not in out:
        out["use_cache"] = False
    return {k: _contiguous(v) for k, v in out.items()}


def _contiguous(value):
    """``value`` with every tensor in it made contiguous: export would otherwise guard on the strides of a
    sliced example (``input_ids.stride()[0] != input_ids.size()[1]``) and refuse every later call."""
    from torch.utils import _pytree

    return _pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), value)


def _dynamic_spec(t: Any):
    """Batch and sequence dims are dynamic; image and feature dims stay static."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return None
    if t.ndim == 1:
        return {0: Dim.AUTO}
    if t.dtype.is_floating_point and t.ndim == 4:  # images (B, C, H, W) or masks (B, 1, S, S)
        if t.shape[1] == 1:
            return {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
        return {0: Dim.AUTO}
    return {0: Dim.AUTO, 1: Dim.AUTO}


@contextlib.contextmanager
def _capture_mode(model: torch.nn.Module):
    """Trace in eval mode without a KV cache, and put the caller's flags back afterwards.

    ``config.use_cache = False`` on every config the modules hold: a forward that takes ``use_cache`` only
    through ``**kwargs`` (GraniteMoE, Switch) would otherwise return its cache object, which export refuses.
    """
    flags = {m: m.training for m in model.modules()}
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and isinstance(getattr(c, "use_cache", None), bool)}
    caches = {k: c.use_cache for k, c in configs.items()}
    model.eval()
    try:
        for c in configs.values():
            c.use_cache = False
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        for k, c in configs.items():
            c.use_cache = caches[k]


def _failing_module(model: torch.nn.Module, exc: BaseException) -> str:
    """The deepest module of ``model`` whose forward is on the traceback of ``exc``."""
    names = {id(m): n for n, m in model.named_modules()}
    where = ""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if id(owner) in names and frame.f_code.co_name == "forward":
            where = names[id(owner)] or type(model).__name__
    return where


def capture(model: torch.nn.Module, example_inputs, dynamic_shapes=None) -> Captured:
    """Export ``model`` on ``example_inputs`` (tuple of args or dict of kwargs)."""
    kwargs = normalize_inputs(model, example_inputs)
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    tries = [kwargs]
    if dynamic_shapes is None:
        dynamic_shapes = {k: _dynamic_spec(v) for k, v in kwargs.items()}
        _refuse_empty_dims(kwargs, dynamic_shapes)
        grown = _grow_unit_dims(kwargs, dynamic_shapes)
        tries = [grown, kwargs] if grown is not None else tries
    errors, where = [], ""
    with _capture_mode(model):
        for kwargs in tries:
            try:
                return _export(model, kwargs, fixed, dynamic_shapes)
            except CaptureError:  # a verdict on the model (state kept between calls), not a tracing failure
                raise
            except Exception as e:  # noqa: BLE001 - we retry and report every attempt
                errors.append(f"torch.export: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                where = where or _failing_module(model, e)
                log.debug("torch.export failed", exc_info=True)
        kwargs = tries[-1]
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        try:
            gm = fx.symbolic_trace(model)
            ShapeProp(gm).propagate(*[kwargs[p.target] for p in gm.graph.nodes if p.op == "placeholder"
                                       if p.target in kwargs])
            return Captured(gm, tensors, fixed, "symbolic_trace", {}, {}, {})
        except Exception as e:  # noqa: BLE001
            errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            where = where or _failing_module(model, e)
    raise CaptureError(
        f"could not capture {type(model).__name__}"
        + (f" (tracing broke in module '{where}')" if where else "")
        + ":\n  " + "\n  ".join(errors)
        + "\nFix: make the forward traceable (no data-dependent Python control flow), or pass "
          "example_inputs that the model accepts.")


def _refuse_empty_dims(kwargs: dict, dynamic_shapes: dict) -> None:
    """An example empty along a batch or sequence dim would fix the graph to that size: refuse it."""
    for name, spec in dynamic_shapes.items():
        t = kwargs.get(name)
        empty = [d for d in spec or () if isinstance(t, torch.Tensor) and t.shape[d] == 0]
        if empty:
            raise CaptureError(f"example input '{name}' of shape {tuple(t.shape)} is empty along dim {empty[0]} "
                               "(a batch or sequence dim). Fix: pass an example with at least one item and "
                               "one token")


def _grow_unit_dims(kwargs: dict, dynamic_shapes: dict):
    """The example with every dynamic dim of size 1 repeated to size 2, or None when there is none.

    ``torch.export`` specializes dims of size 0 and 1, so a batch-1 or one-token example would pin the
    captured graph to that size; the repeated copy holds the same values and is a valid input as well.
    """
    out, grew = dict(kwargs), False
    for name, spec in dynamic_shapes.items():
        t = kwargs.get(name)
        if not isinstance(t, torch.Tensor) or not isinstance(spec, dict):
            continue
        for d in spec:
            if t.shape[d] == 1:
                t, grew = t.repeat_interleave(2, dim=d), True
        out[name] = t
    return out if grew else None


def _inline_grad_regions(gm: fx.GraphModule) -> None:
    """Inline export's ``wrap_with_set_grad_enabled`` regions (a ``torch.no_grad()`` block becomes a subgraph) into
    ``gm``: grad mode does not change what inference computes, and attention inside them must be visible to
    recognition (HRM runs its early recurrent cycles under ``no_grad``)."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    graph = gm.graph
    while hop is not None:
        regions = [n for n in graph.nodes if n.op == "call_function" and n.target is hop]
        if not regions:
            break
        for node in regions:
            holder = node.args[1]
            sub = getattr(gm, holder.target)
            env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args[2:]))
            out = None
            with graph.inserting_before(node):
                for sn in sub.graph.nodes:
                    if sn.op == "placeholder":
                        continue
                    if sn.op == "output":
                        out = fx.map_arg(sn.args[0], env.__getitem__)
                        break
                    if sn.op == "get_attr":
                        name = f"{holder.target}_{sn.target}".replace(".", "_")
                        setattr(gm, name, operator.attrgetter(sn.target)(sub))  # a tensor or a nested region
                        env[sn] = graph.get_attr(name)
                    else:
                        env[sn] = graph.node_copy(sn, env.__getitem__)
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(out[user.args[1]])
                    graph.erase_node(user)
            if node.users:
                node.replace_all_uses_with(out)
            graph.erase_node(node)
            if not holder.users:
                graph.erase_node(holder)
                delattr(gm, holder.target)
    graph.lint()
    gm.recompile()


def _export(model, kwargs: dict, fixed: dict, dynamic_shapes) -> Captured:
    """``torch.export`` (non-strict) of ``model`` on ``kwargs``, with the dynamic dims' symbols and sizes."""
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    for w in seen:
        found = re.search(r"tensor attribute (\S+) was assigned during export", str(w.message))
        if found:  # state kept between calls: the captured graph would compute something else
            raise CaptureError(f"the model keeps state between calls: its forward assigns the tensor attribute "
                               f"'{found.group(1)}' (a recurrent state or cache held on the module). Fix: convert a "
                               "model whose forward is a function of its inputs (pass the state in and out), or "
                               "reset it to a fixed buffer")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    gm = ep.module()
    _inline_grad_regions(gm)
    sizes, ranges = {}, {}
    for sym, vr in ep.range_constraints.items():
        ranges[str(sym)] = (_as_int(vr.lower, 0), _as_int(vr.upper, 1 << 30))
    dim_symbols = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in tensors:
            val = node.meta.get("val")
            for d, s in enumerate(getattr(val, "shape", ())):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    dim_symbols.setdefault(node.name, {})[d] = str(s.node.expr)
                    sizes[str(s.node.expr)] = tensors[node.name].shape[d]
    return Captured(gm, tensors, fixed, "export", sizes, ranges, dim_symbols)


def _as_int(v, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return default


class ShapeProp(fx.Interpreter):
    """Record ``meta['val']`` (fake-free, real tensors) for symbolic_trace graphs."""

    def run_node(self, n):
        out = super().run_node(n)
        n.meta["val"] = out
        return out


def flat_inputs(cap: Captured, kwargs: dict) -> list:
    """Positional values for the graph's placeholders."""
    full = {**kwargs, **cap.fixed}
    out = []
    for node in cap.gm.graph.nodes:
        if node.op == "placeholder":
            out.append(full.get(node.target, full.get(node.name)))
    return out


def resize_inputs(cap: Captured, kwargs: dict, grow: int = 1) -> dict:
    """Example inputs with every dynamic dim changed to another valid size (cyclic repeat).

    Used to check results at batch sizes and sequence lengths other than the traced ones.
    """
    # symbols with the same example size move together (export may not have unified them)
    by_size = {}
    for i, size in enumerate(sorted(set(cap.symbol_sizes.values()))):
        by_size[size] = size + grow + 2 * i
    new_size = {}
    for sym, size in cap.symbol_sizes.items():
        lo, hi = cap.symbol_ranges.get(sym, (2, 1 << 30))
        new_size[sym] = by_size[size] if by_size[size] <= hi else max(lo, size - 1)
    out = dict(kwargs)
    for name, dims in cap.dim_symbols.items():
        t = kwargs[name]
        for d, sym in dims.items():
            idx = torch.arange(new_size[sym]) % t.shape[d]
            t = t.index_select(d, idx.to(t.device))
        out[name] = t
    return out


def scramble_inputs(kwargs: dict) -> dict:
    """Example inputs with their values replaced: floats by noise, 0/1 masks by random keep patterns.

    A 0/1 mask keeps its first key in every row, so no query is left without a key. Other integer
    inputs (token ids, positions) are kept: they would not say more about the mask's structure.
    """
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in kwargs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
        elif isinstance(t, torch.Tensor) and t.numel() and bool(((t == 0) | (t == 1)).all()) and t.dim() >= 1:
            keep = torch.randint(0, 2, t.shape, generator=g).to(t.device, t.dtype)
            keep[..., 0] = 1
            t = keep
        out[name] = t
    return out
