"""A converted site as JSON (for a model folder's config.json) and back: the op's shapes and parts, and how
its adapter reads the module's arguments. The weights travel separately, in the folder's weights file.

    op_spec(op) -> {"shapes", "k_map", "v_map", "scale", "causal", "info", "q_transform", "k_transform",
                    "score_fn", "head_gate", "weights", "bias_map", "bias_heads", "softcap", "sink_logits", "window",
                    "sinks"}
    plan_spec(plan) -> {"name", "inputs": [{"paths", "graph"} | None], "out_path", "out_spec", "layer_idx", "causal"}

A multi-head latent attention site (``rewrite.latent``) is ``{"latent": True, "shapes", "rope_map", "scale", "causal",
"info", "softcap", "q_norm", "kv_norm", "q_rope", "k_rope"}``: its weight shapes and its norm/RoPE graphs (a partial
RoPE of ``mla`` adds the kept dims, ``{"partial": {"index", "head_dim"}}``).

Parts (score functions, head gates, weight providers) are stored by class name with their ``to_spec()``
and rebuilt uninitialised by ``from_spec``; weight providers shared across sites (MASA's atoms) are numbered
in ``groups`` so that the rebuilt sites share them again.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
from torch.utils import _pytree as pytree

from .errors import RewriteError
from .fx_json import graph_from_json, graph_to_json
from .ir import Attention, HeadTransform, SiteInfo

__all__ = ["op_spec", "op_from_spec", "plan_spec", "plan_from_spec", "PART_CLASSES"]

FIELDS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")
LATENT_FIELDS = ("w_q", "b_q", "w_dq", "b_dq", "w_dkv", "b_dkv", "w_kr", "b_kr", "w_uk", "b_uk", "w_uv", "b_uv", "wo", "bo")
LATENT_TRANSFORMS = ("q_norm", "kv_norm", "q_rope", "k_rope")
PART_CLASSES = {  # class name -> module holding it
    "ClippedSoftmax": "rewrite.scores", "SigmoidHeadGate": "rewrite.scores", "MoHGate": "rewrite.scores",
    "LinearAttention": "rewrite.passes.lit", "AtomWeights": "rewrite.passes.masa", "OutputGate": "rewrite.output_gate",
}


def _part_spec(part, groups: dict):
    if part is None:
        return None
    name = type(part).__name__
    if name not in PART_CLASSES or not hasattr(part, "to_spec"):
        raise RewriteError(f"{name} cannot be written to a model folder yet (no to_spec)")
    spec = part.to_spec(groups) if name == "AtomWeights" else part.to_spec()
    return {"class": name, "spec": spec}


def _part_from_spec(d, groups: dict):
    if d is None:
        return None
    cls = getattr(importlib.import_module(PART_CLASSES[d["class"]]), d["class"])
    return cls.from_spec(d["spec"], groups=groups)


def _transform_spec(t):
    if t is None:
        return None
    return {"n_side": t.n_side, "description": t.description, "heads": t.heads, "graph": graph_to_json(t.fn)}


def _transform_from_spec(d):
    if d is None:
        return None
    return HeadTransform(graph_from_json(d["graph"]), d["n_side"], d["description"], heads=d.get("heads"))


def _info_spec(op) -> dict:
    return {f.name: getattr(op.info, f.name) for f in dataclasses.fields(SiteInfo) if f.name != "sources"}


def _latent_transform_spec(t):
    if type(t).__name__ == "PartialRope":  # rewrite.passes.mla: RoPE on the kept dims of each head
        return {**_transform_spec(t.transform), "partial": {"index": t.index.tolist(), "head_dim": t.head_dim}}
    if t is not None and not isinstance(t, HeadTransform):
        raise RewriteError(f"{type(t).__name__} cannot be written to a model folder yet (a latent site's norm or RoPE)")
    return _transform_spec(t)


def _latent_transform_from_spec(d):
    t = _transform_from_spec(d)
    if d is not None and d.get("partial"):
        from .passes.mla import PartialRope

        t = PartialRope(t, torch.tensor(d["partial"]["index"], device="cpu"), d["partial"]["head_dim"])
    return t


def latent_spec(op) -> dict:
    """A ``LatentAttention``'s spec (see the module docstring)."""
    return {"latent": True, "dtype": str(op.wo.dtype).replace("torch.", ""),
            "shapes": {f: (list(getattr(op, f).shape) if getattr(op, f) is not None else None) for f in LATENT_FIELDS},
            "rope_map": op.rope_map.tolist(), "scale": op.scale, "causal": op.causal, "info": _info_spec(op),
            "softcap": op.softcap, **{k: _latent_transform_spec(getattr(op, k)) for k in LATENT_TRANSFORMS}}


def latent_from_spec(spec: dict):
    """A ``LatentAttention`` of these shapes and graphs, with zero weights (the weights file fills them)."""
    from .latent import LatentAttention

    dtype = getattr(torch, spec["dtype"])
    t = {f: (torch.zeros(s, dtype=dtype) if s is not None else None) for f, s in spec["shapes"].items()}
    parts = {k: _latent_transform_from_spec(spec[k]) for k in LATENT_TRANSFORMS}
    return LatentAttention(**t, **parts, rope_map=torch.tensor(spec["rope_map"], device="cpu"), scale=spec["scale"],
                           causal=spec["causal"], info=SiteInfo(**spec["info"]), softcap=spec.get("softcap", 0.0))


def op_spec(op: Attention, groups: dict) -> dict:
    from .latent import is_latent

    if is_latent(op):
        return latent_spec(op)
    info = _info_spec(op)
    own = op.weights is None
    return {
        "shapes": {f: (list(getattr(op, f).shape) if getattr(op, f) is not None else None) for f in FIELDS},
        "owned": own, "dtype": str(op.bo.dtype if op.bo is not None else op.wq.dtype).replace("torch.", ""),
        "k_map": op.k_map.tolist(), "v_map": op.v_map.tolist(), "scale": op.scale, "causal": op.causal,
        "info": info, "q_transform": _transform_spec(op.q_transform), "k_transform": _transform_spec(op.k_transform),
        "v_transform": _transform_spec(op.v_transform),
        "score_fn": _part_spec(op.score_fn, groups), "head_gate": _part_spec(op.head_gate, groups),
        "weights": _part_spec(op.weights, groups),
        "bias_map": None if op.bias_map is None else op.bias_map.tolist(), "bias_heads": op.bias_heads,
        "softcap": op.softcap, "sink_logits": op.sink_logits is not None,
        "window": None if op.window is None else op.window.tolist(),
        "sinks": None if op.sinks is None else op.sinks.tolist(),
    }


def op_from_spec(spec: dict, groups: dict) -> Attention:
    """An op of these shapes and parts, with zero weights (the weights file fills them)."""
    if spec.get("latent"):
        return latent_from_spec(spec)
    dtype = getattr(torch, spec["dtype"])
    t = {f: (torch.zeros(s, dtype=dtype) if s is not None else None) for f, s in spec["shapes"].items()}
    transforms = {key: _transform_from_spec(spec.get(key)) for key in ("q_transform", "k_transform", "v_transform")}
    maps = {m: torch.tensor(spec[m], device="cpu") for m in ("k_map", "v_map")}  # real values, even under meta
    bias_map = spec.get("bias_map")
    op = Attention(**t, **maps, scale=spec["scale"],
                   causal=spec["causal"], info=SiteInfo(**spec["info"]), **transforms,
                   bias_map=None if bias_map is None else torch.tensor(bias_map, device="cpu"),
                   bias_heads=spec.get("bias_heads", 0), softcap=spec.get("softcap", 0.0),
                   sink_logits=torch.zeros(t["wq"].shape[0], dtype=dtype) if spec.get("sink_logits") else None,
                   window=spec.get("window"), sinks=spec.get("sinks"))
    op.score_fn = _part_from_spec(spec["score_fn"], groups)
    op.head_gate = _part_from_spec(spec["head_gate"], groups)
    provider = _part_from_spec(spec["weights"], groups)
    if provider is not None:
        op.use_weights(provider)
    return op


def _path_spec(path) -> list:
    from .hf_adapter import SITE_OUTPUT

    if path == SITE_OUTPUT:
        return [["site", 0]]
    out = []
    for k in path:
        if isinstance(k, pytree.SequenceKey):
            out.append(["seq", k.idx])
        elif isinstance(k, pytree.MappingKey):
            out.append(["map", k.key])
        else:
            raise RewriteError(f"cannot store the argument path element {k!r}")
    return out


def _path_from_spec(items) -> tuple:
    from .hf_adapter import SITE_OUTPUT

    if items == [["site", 0]]:
        return SITE_OUTPUT
    return tuple(pytree.SequenceKey(v) if kind == "seq" else pytree.MappingKey(v) for kind, v in items)


def _replay_spec(r):
    return None if r is None else {"paths": [_path_spec(p) for p in r.paths], "graph": graph_to_json(r.fn)}


def _replay_from_spec(d):
    from .hf_adapter import Replay

    return None if d is None else Replay([_path_from_spec(p) for p in d["paths"]], graph_from_json(d["graph"]))


def plan_spec(plan) -> dict:
    return {"index": plan.index, "name": plan.name, "inputs": [_replay_spec(r) for r in plan.inputs],
            "out_path": plan.out_path, "out_spec": pytree.treespec_dumps(plan.out_spec), "layer_idx": plan.layer_idx,
            "causal": plan.causal, "tail": _replay_spec(plan.tail)}


def plan_from_spec(d: dict):
    from .hf_adapter import SitePlan

    return SitePlan(d["index"], d["name"], [_replay_from_spec(r) for r in d["inputs"]], d["out_path"],
                    pytree.treespec_loads(d["out_spec"]), d["layer_idx"], d["causal"], _replay_from_spec(d.get("tail")))
