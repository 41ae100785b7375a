"""Converted sites inside a Hugging Face model: every attention module becomes a ``SiteAdapter``.

    module(*args, **kwargs) = out_spec(op(x, kv, mask, *side, cache=LayerCache(cache, layer_idx)))

where ``x, kv, mask, side = replay(leaves of (args, kwargs))``. The replay graphs are the parts of the
captured graph between the module's own inputs (hidden states, rotary cos/sin, the 4-D mask, ...) and the
site's inputs, cut out of the graph by module provenance; which forward argument feeds which graph value is
found by running the source model once with the example inputs and matching values (structure, then
execution: never by argument names). The module's output structure is kept (the attention weights are None).

Refused, with the reason (``GenerationError``): a module whose output is not the site's output (the
attention lives inside a larger module), an input of the site that no forward argument gives, and
cross-attention (its encoder cache).
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Optional

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .cache import LayerCache
from .capture import flat_inputs
from .errors import RewriteError
from .recognize import combine_masks, run_with_env

__all__ = ["GenerationError", "SiteAdapter", "to_transformers", "source_model", "site_plans"]

INPUT_NAMES = ("x", "kv", "mask")
SITE_OUTPUT = ("site",)  # the path of the site's own output among a tail graph's leaves


class GenerationError(RewriteError):
    """A converted model cannot run as a Hugging Face model (generate, save_pretrained, ONNX decoder)."""


@dataclasses.dataclass
class Replay:
    """One site input as a function of the module's forward arguments: ``fn(*leaves at paths)``."""

    paths: list  # pytree key paths into (args, kwargs)
    fn: fx.GraphModule


@dataclasses.dataclass
class SitePlan:
    """How the module at ``name`` feeds site ``index``: its inputs, its output, its cache layer."""

    index: int
    name: str
    inputs: list  # Replay | None for x, kv, mask, *sides
    out_path: tuple  # where the site's output sits in the module's output
    out_spec: object  # the module output's pytree structure
    layer_idx: int
    causal: bool  # a self-attention site that hides later keys (when the model passes no mask)
    tail: Optional[Replay] = None  # the module's own ops after the site (residual, norm), if any


def _resolve(args, kwargs, path):
    obj = (args, kwargs)
    for key in path:
        try:
            obj = key.get(obj) if hasattr(key, "get") else obj[key]
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return obj


class SiteAdapter(nn.Module):
    """Runs a canonical op in place of a Hugging Face attention module (same arguments, same outputs)."""

    def __init__(self, op: nn.Module, plan: SitePlan):
        super().__init__()
        self.op = op
        self.plan = plan
        self.replays = nn.ModuleList([r.fn if r is not None else nn.Identity() for r in plan.inputs])
        self.layer_idx = plan.layer_idx
        self.is_causal = plan.causal
        self.tail = plan.tail.fn if plan.tail is not None else None

    def _input(self, i: int, args, kwargs):
        replay = self.plan.inputs[i]
        if replay is None:
            return None
        leaves = [_resolve(args, kwargs, p) for p in replay.paths]
        if any(v is None for v in leaves):
            return None  # e.g. no mask: the model relies on the causal rule
        return self.replays[i](*leaves)

    def forward(self, *args, **kwargs):
        x, kv, mask = (self._input(i, args, kwargs) for i in range(3))
        side = [self._input(i, args, kwargs) for i in range(3, len(self.plan.inputs))]
        layer = _layer_cache(args, kwargs, self.layer_idx, self.op.info.cross)
        y = self.op(x, kv, mask, *side, cache=layer, is_causal=self.plan.causal)  # causal when no mask is given
        if self.tail is not None:
            y = self.tail(*[y if p == SITE_OUTPUT else _resolve(args, kwargs, p) for p in self.plan.tail.paths])
        leaves = [None] * self.plan.out_spec.num_leaves
        leaves[self.plan.out_path] = y
        return pytree.tree_unflatten(leaves, self.plan.out_spec)


def _layer_cache(args, kwargs, layer_idx: int, cross: bool) -> Optional[LayerCache]:
    from transformers.cache_utils import Cache, EncoderDecoderCache

    for v in list(kwargs.values()) + list(args):
        if isinstance(v, EncoderDecoderCache):
            if cross:
                raise GenerationError("cross-attention sites cannot decode with a cache yet (encoder-decoder "
                                      "generation is not supported)")
            return LayerCache(v.self_attention_cache, layer_idx)
        if isinstance(v, Cache):
            return LayerCache(v, layer_idx)
    return None


# ---- planning: which forward argument feeds which graph value ---------------------------------------------
def _in_module(node: fx.Node, path: str) -> bool:
    if node.op == "call_function" and node.target is combine_masks:
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return node.op == "call_function" and any(p == path or p.startswith(path + ".") for p, _ in stack.values())


def _cut(node: fx.Node, path: str, gm: fx.GraphModule):
    """The nodes of ``path``'s module that compute ``node``: (graph f(*boundaries), boundary nodes).

    A boundary is a value the module receives (computed outside it, or a graph input).
    """
    order, seen = [], set()

    def visit(n: fx.Node):  # post-order: inputs before users
        if n in seen:
            return
        seen.add(n)
        if _in_module(n, path):
            for a in n.all_input_nodes:
                visit(a)
        order.append(n)

    visit(node)
    g, new, holder, bounds = fx.Graph(), {}, nn.Module(), []
    for n in order:
        if n.op != "get_attr" and not _in_module(n, path):
            bounds.append(n)
            new[n] = g.placeholder(f"leaf_{len(bounds) - 1}")
    for n in order:
        if n.op == "get_attr":
            key = n.target.replace(".", "_")
            value = operator.attrgetter(n.target)(gm)
            if isinstance(value, nn.Parameter):
                holder.register_parameter(key, value)
            elif isinstance(value, torch.Tensor):
                holder.register_buffer(key, value)
            else:
                setattr(holder, key, value)
            new[n] = g.get_attr(key)
        elif n not in new:
            new[n] = g.create_node(n.op, n.target, fx.map_arg(n.args, new.__getitem__),
                                   fx.map_arg(n.kwargs, new.__getitem__), name=n.name)
    g.output(new[node])
    return fx.GraphModule(holder, g), bounds


def _same(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)))


def _find(value, leaves: list, what: str, name: str):
    for path, leaf in leaves:
        if _same(value, leaf):
            return path
    raise GenerationError(f"{name}: no argument of the module gives its {what} (shape "
                          f"{tuple(getattr(value, 'shape', ()))}); it is computed from something the module "
                          "does not receive, so the site cannot run inside the Hugging Face model")


def _argument_path(module: nn.Module, args, kwargs, name: str):
    """The pytree path of forward argument ``name`` in ``(args, kwargs)`` (None if the signature lacks it)."""
    import inspect

    params = list(inspect.signature(module.forward).parameters)
    if name not in params:
        return None
    if name in kwargs or params.index(name) >= len(args):
        return (pytree.SequenceKey(1), pytree.MappingKey(name))
    return (pytree.SequenceKey(0), pytree.SequenceKey(params.index(name)))


def _identity() -> fx.GraphModule:
    g = fx.Graph()
    g.output(g.placeholder("leaf_0"))
    return fx.GraphModule(nn.Module(), g)


def _record(model: nn.Module, names: list, call) -> dict:
    """name -> (args, kwargs, output) of each module's first call during ``call()``."""
    seen, hooks = {}, []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise GenerationError(f"{name}: the site is not a module of the model (inline attention), so no "
                                  "module can be swapped for it") from None

        def pre(m, args, kwargs, name=name):
            seen.setdefault(name, [args, kwargs, None])

        def post(m, args, kwargs, out, name=name):
            if seen[name][2] is None:
                seen[name][2] = out

        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return seen


def site_plans(conv, model: nn.Module) -> list:
    """One ``SitePlan`` per site of ``conv``, read off ``model`` (an unconverted copy of the source)."""
    from .graph import SITES

    cap = conv._captured
    env = run_with_env(cap.gm, flat_inputs(cap, cap.kwargs))
    ops = conv.sites
    names = [op.info.name for op in ops]
    records = _record(model, sorted(set(names)), lambda: model(**cap.kwargs, **cap.fixed))
    calls = {int(str(n.target).split(".")[1]): n for n in cap.gm.graph.nodes
             if n.op == "call_module" and str(n.target).startswith(SITES + ".")}
    plans = []
    for i, op in enumerate(ops):
        name = op.info.name
        if name not in records:
            raise GenerationError(f"{name}: the module was never called on the example inputs")
        args, kwargs, out = records[name]
        leaves = [(p, v) for p, v in pytree.tree_flatten_with_path((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        node = calls[i]
        inputs = []
        for j, a in enumerate(node.args):
            if not isinstance(a, fx.Node):
                inputs.append(None)
                continue
            fn, bounds = _cut(a, name, cap.gm)
            what = INPUT_NAMES[j] if j < 3 else f"side input {j - 3} (rotary tables)"
            try:
                paths = [_find(env[b], leaves, what, name) for b in bounds]
            except GenerationError:
                if j != 2 or _argument_path(model.get_submodule(name), args, kwargs, "attention_mask") is None:
                    raise
                # the model passed no mask on the example (SDPA's causal shortcut): read the module's
                # attention_mask argument itself, an SDPA mask (bool keep or additive) when there is one
                fn, paths = _identity(), [_argument_path(model.get_submodule(name), args, kwargs, "attention_mask")]
            inputs.append(Replay(paths, fn))
        out_index, out_spec, tail = _output_of(cap.gm, env, node, name, out, leaves)
        mod = model.get_submodule(name)
        layer_idx = getattr(mod, "layer_idx", None)
        causal = bool(op.causal or op.info.causal_mask or getattr(mod, "is_causal", False)) and not op.info.cross
        plans.append(SitePlan(i, name, inputs, out_index, out_spec, i if layer_idx is None else int(layer_idx),
                              causal, tail))
    return plans


def _output_of(gm, env, node, name: str, out, leaves):
    """(leaf index, output structure, tail replay or None): where the module's output comes from.

    Usually the site's output is the module's output. Otherwise (BERT's attention adds the residual and a
    norm) the module's own nodes after the site are cut out as a tail graph f(site output, arguments).
    """
    out_leaves, out_spec = pytree.tree_flatten(out)
    hits = [k for k, v in enumerate(out_leaves) if _same(env[node], v)]
    if hits:
        return hits[0], out_spec, None
    order = list(gm.graph.nodes)
    after = order[order.index(node):]
    for k, v in enumerate(out_leaves):
        found = [n for n in after if _in_module(n, name) and _same(env.get(n), v)]
        if found:
            fn, bounds = _cut(found[-1], name, gm)
            if node in bounds:
                paths = [SITE_OUTPUT if b is node else _find(env[b], leaves, "output", name) for b in bounds]
                return k, out_spec, Replay(paths, fn)
    raise GenerationError(f"{name}: the module's output could not be traced back to the site's output, so the "
                          "module cannot be swapped for the site")


# ---- the Hugging Face model ---------------------------------------------------------------------------------
def source_model(conv, what: str):
    """The Hugging Face model ``conv`` was converted from, or a GenerationError naming why not."""
    import transformers

    model = conv.__dict__.get("_source")
    if model is None:
        raise GenerationError(f"{what} needs the source model; this converted model was loaded without it "
                              "(convert again with rewrite.convert)")
    if not isinstance(model, transformers.PreTrainedModel):
        raise GenerationError(f"{what} needs a Hugging Face model (transformers.PreTrainedModel); "
                              f"{type(model).__name__} is not one. Run the converted module yourself, or save it "
                              "with conv.save('model.pt2')")
    return model


def to_transformers(conv):
    """A copy of the source Hugging Face model whose attention modules run ``conv``'s ops (weights shared)."""
    model = source_model(conv, "to_transformers")
    shared = dict(conv.gm.named_parameters(remove_duplicate=False))
    shared.update(dict(conv.gm.named_buffers(remove_duplicate=False)))
    memo = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if name in shared and shared[name].shape == t.shape:
            memo[id(t)] = shared[name]
    hf = copy.deepcopy(model, memo)
    plans = site_plans(conv, model)  # read where the captured graph's weights hold (distill may move the others)
    for plan, op in zip(plans, conv.sites):
        hf.set_submodule(plan.name, SiteAdapter(op, plan))
    hf.eval()
    hf.rewrite_report = conv.report
    return hf
