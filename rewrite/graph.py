"""Graph surgery: put canonical Attention nodes into a captured graph, copy graphs cheaply, list sites."""
from __future__ import annotations

import copy

import torch
from torch import fx

from .ir import Attention
from .recognize import combine_masks

__all__ = ["SITES", "install", "eliminate_dead_code", "sites", "with_sites", "count_params", "remove_unused_attrs"]

SITES = "rewrite_sites"  # submodule holding the canonical ops, one per site: rewrite_sites.0, .1, ...


def install(gm: fx.GraphModule, matches: list) -> fx.GraphModule:
    """Replace each matched region of ``gm`` (in place) by one call to its canonical op."""
    holder = torch.nn.Module()
    gm.add_module(SITES, holder)
    g = gm.graph
    combined = {}  # one mask node per distinct (kinds, mask nodes): sites of one model share it
    for i, m in enumerate(matches):
        holder.add_module(str(i), m.op)
        with g.inserting_before(m.out_node):
            mask = None
            if m.masks:
                key = (tuple(k for k, _ in m.masks), *[n for _, n in m.masks])
                if key not in combined:
                    combined[key] = g.call_function(combine_masks, key)
                mask = combined[key]
            node = g.call_module(f"{SITES}.{i}", (m.x, m.kv, mask, *m.sides))
            node.meta["rewrite_site"] = m.name
            out = node
            if m.out_2d:
                out = g.call_method("flatten", (node, 0, -2))
        m.out_node.replace_all_uses_with(out)
    for n in list(g.nodes):  # metadata checks would keep dead region nodes alive
        if n.op == "call_function" and "_assert_tensor_metadata" in str(n.target):
            g.erase_node(n)
    eliminate_dead_code(gm)
    g.lint()
    remove_unused_attrs(gm)
    gm.recompile()
    return gm


def _impure(n: fx.Node) -> bool:
    """Only real side effects count: SDPA is tagged nondeterministic (dropout) yet is dead code here; an
    in-place op (``copy_`` into a slice, as the chunked gated-delta rule writes its matrix) is kept."""
    if n.op in ("placeholder", "output", "call_module"):
        return True
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    return n.target in fx.node._side_effectful_functions or bool(schema is not None and schema.is_mutable)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(is_impure_node=_impure)


def remove_unused_attrs(gm: fx.GraphModule) -> None:
    """Drop parameters and buffers no get_attr node reads (the replaced projections)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_mods = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used or any(name.startswith(m + ".") for m in used_mods):
            continue
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
    gm.delete_all_unused_submodules()


def sites(gm: fx.GraphModule) -> list:
    """The canonical ops of ``gm`` in site order."""
    holder = getattr(gm, SITES, None)
    if holder is None:
        return []
    return [holder.get_submodule(str(i)) for i in range(len(holder._modules))]


def with_sites(gm: fx.GraphModule, replace: dict) -> fx.GraphModule:
    """A new GraphModule sharing everything with ``gm`` except the sites in ``replace`` (index -> op).

    The old graph module stays untouched, so every stage of a pipeline keeps its own model.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec", "meta"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.graph._codegen = copy.deepcopy(gm.graph._codegen)
    holder = torch.nn.Module()
    for i, op in enumerate(sites(gm)):
        holder.add_module(str(i), replace.get(i, op))
    setattr(new, SITES, holder)
    new.recompile()
    return new


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def isinstance_attention(m) -> bool:
    return isinstance(m, Attention)
