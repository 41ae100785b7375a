"""LoRA (peft) on the untouched Linear layers of a converted model, for ``rewrite.distill(..., lora=r)``:

    W' = W + (α/r)·B A,   A [r, in] (peft's init), B [out, r] = 0 at the start, so training starts from the model

The captured graph calls its Linear layers as ``aten.linear(x, W, b)`` on stored weights, which peft cannot
wrap; ``attach_lora`` builds a second GraphModule over the *same* parameters and site modules in which each
such call is an ``nn.Linear`` holding W, and peft's ``inject_adapter_in_model`` wraps those. ``merge()`` folds
every B A into its W in place (the converted model's own weight: each target weight is given a copy of its own
first, so the original model, the captured stage and earlier stages keep theirs), so the converted model is a
plain model again: same graph, same parameter names, no adapter modules.

Targets: every linear call outside the attention sites whose weight is 2-D and read by that call only (a
weight tied to an embedding, such as a tied ``lm_head``, is left alone). The attention sites a pass changed
train their own parameters in full (``distill.trainable_parameters``); those left unchanged get no adapter on
their projections (their weights are per-head tensors, not Linear layers).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .errors import RewriteError
from .graph import SITES

__all__ = ["attach_lora", "LoraGraph", "lora_targets"]

HOLDER = "rewrite_lora"  # the submodule of the training graph holding the wrapped Linear layers


def lora_targets(gm: fx.GraphModule) -> list:
    """(linear node, weight name, bias name or None) of every Linear call LoRA may adapt (module docstring)."""
    out = []
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        w = node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
            continue
        if str(w.target).startswith(SITES + ".") or w.target not in params or params[w.target].dim() != 2:
            continue
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and b.target in params):
            continue
        out.append((node, w.target, None if b is None else b.target))
    return out


class LoraGraph:
    """The training graph with peft adapters; ``module`` runs like ``student.gm``; ``merge()`` ends it."""

    def __init__(self, module: fx.GraphModule, names: list):
        self.module, self.names = module, names

    def parameters(self) -> list:
        """The adapters' parameters (peft's lora_A and lora_B of every wrapped layer)."""
        return [p for n, p in self.module.named_parameters() if "lora_" in n]

    def layers(self) -> list:
        holder = getattr(self.module, HOLDER)
        return [getattr(holder, n) for n in self.names]

    @torch.no_grad()
    def merge(self) -> None:
        """W += (α/r)·B A for every adapter, in the converted model's own weights (peft's merge)."""
        for layer in self.layers():
            layer.merge()


def attach_lora(student, rank: int, alpha=None) -> LoraGraph:
    """peft LoRA adapters of rank ``rank`` (α = ``alpha``, default 2·rank as LoLCATs uses) on the untouched Linear
    layers of ``student.gm`` (a ``rewrite.Converted``); ``student.gm`` itself is not changed until ``merge()``."""
    from peft import LoraConfig, inject_adapter_in_model

    if not (isinstance(rank, int) and rank > 0):
        raise RewriteError(f"distill: lora must be a positive integer rank, got {rank!r}")
    gm = student.gm
    targets = lora_targets(gm)
    if not targets:
        raise RewriteError("distill lora: the converted model has no Linear call outside the attention sites "
                           "with a weight of its own to adapt; use lora=0")
    for name in [w for _, w, _ in targets]:  # merging writes into these: copies of the converted model's own
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner)
        module._parameters[attr] = nn.Parameter(module._parameters[attr].detach().clone())
    params = dict(gm.named_parameters(remove_duplicate=False))
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    holder, names = nn.Module(), []
    for i, (node, w, b) in enumerate(targets):
        weight = params[w]
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        layer.weight = weight  # the same Parameter: merging writes into the converted model
        if b is not None:
            layer.bias = params[b]
        names.append(f"linear{i}")
        holder.add_module(names[-1], layer)
        mine = by_name[node.name]
        with graph.inserting_before(mine):
            call = graph.call_module(f"{HOLDER}.{names[-1]}", (mine.args[0],))
        mine.replace_all_uses_with(call)
        graph.erase_node(mine)
    gm.add_submodule(HOLDER, holder)
    try:
        module = fx.GraphModule(gm, graph)
    finally:
        delattr(gm, HOLDER)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=[f"{HOLDER}.{n}" for n in names])
    inject_adapter_in_model(config, module)
    return LoraGraph(module, names)
