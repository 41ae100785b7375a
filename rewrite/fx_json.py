"""Small fx graphs (per-head transforms, adapter replays) to JSON and back, without pickle.

    graph → {"nodes": [{op, name, target, args, kwargs}], "consts": {name: {shape, dtype}}}

Targets are ATen overloads (``aten.mul.Tensor``), tensor method names, ``operator``/``math`` functions, a few
``torch`` functions and rewrite's own (``combine_masks``, the per-head replays ``reshape_tail``/``to_flat``/``from_flat``); anything else is refused by name. Constant tensors
(``get_attr``, e.g. a q/k-norm weight) become buffers of the rebuilt module, so their values travel in the
weights file; ``consts`` holds only their shapes and dtypes.
"""
from __future__ import annotations

import builtins
import math
import operator

import torch
from torch import fx, nn

from .errors import RewriteError

__all__ = ["graph_to_json", "graph_from_json", "graph_constants"]

_PY_MODULES = {"operator": operator, "math": math, "builtins": builtins}


def _rewrite_functions() -> dict:
    """rewrite's own functions that captured graphs call: masks, and per-head replays of reshapes and flat ops."""
    from .recognize import combine_masks
    from .recognize.transforms import from_flat, reshape_tail, to_flat

    return {"combine_masks": combine_masks, "reshape_tail": reshape_tail, "to_flat": to_flat, "from_flat": from_flat}


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return "aten:" + str(target)  # e.g. aten.mul.Tensor
    for key, fn in _rewrite_functions().items():
        if target is fn:
            return f"rewrite:{key}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", "")
    if module in ("_operator", "operator") and hasattr(operator, name):
        return f"py:operator.{name}"
    if module == "math" or (module == "builtins" and hasattr(builtins, name)):
        return f"py:{'math' if module == 'math' else 'builtins'}.{name}"
    if module.startswith("torch") and getattr(torch, name, None) is target:
        return f"torch:{name}"
    raise RewriteError(f"cannot store the graph op {target!r} ({module}.{name}) in a model folder")


def _resolve(name: str):
    kind, _, rest = name.partition(":")
    if not rest:
        return name  # a call_method name, placeholder or attribute target
    if kind == "aten":
        ns, op, overload = rest.split(".")
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    if kind == "rewrite":
        return _rewrite_functions()[rest]
    if kind == "py":
        mod, _, attr = rest.partition(".")
        return getattr(_PY_MODULES[mod], attr)
    if kind == "torch":
        return getattr(torch, rest)
    raise RewriteError(f"unknown graph op '{name}' in the stored graph")


def _encode(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [_encode(x) for x in a]}
    if isinstance(a, dict):
        return {"dict": {k: _encode(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start), _encode(a.stop), _encode(a.step)]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": "cpu"}  # re-placed on load; graphs follow their inputs' device
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, float) and not math.isfinite(a):
        return {"float": repr(a)}
    if a is Ellipsis:
        return {"ellipsis": True}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise RewriteError(f"cannot store the graph argument {a!r} ({type(a).__name__}) in a model folder")


def _decode(a, nodes: dict):
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "node":
        return nodes[v]
    if kind in ("list", "tuple"):
        items = [_decode(x, nodes) for x in v]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(x, nodes) for k, x in v.items()}
    if kind == "slice":
        return slice(*(_decode(x, nodes) for x in v))
    if kind in ("dtype", "memory_format", "layout"):
        return getattr(torch, v)
    if kind == "device":
        return torch.device(v)
    if kind == "float":
        return float(v)
    if kind == "ellipsis":
        return Ellipsis
    raise RewriteError(f"unknown stored graph argument kind '{kind}'")


def graph_constants(gm: fx.GraphModule) -> dict:
    """get_attr target -> tensor, for every constant the graph reads."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out[n.target] = operator.attrgetter(n.target)(gm)
    return out


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        nodes.append({"op": n.op, "name": n.name, "target": _target_name(n.target),
                      "args": _encode(n.args), "kwargs": _encode(n.kwargs)})
    consts = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
              for k, v in graph_constants(gm).items()}
    return {"nodes": nodes, "consts": consts}


def graph_from_json(data: dict) -> fx.GraphModule:
    """The graph module, its constants as (uninitialised) buffers to be filled from the weights file."""
    g, nodes = fx.Graph(), {}
    for d in data["nodes"]:
        args, kwargs = _decode(d["args"], nodes), _decode(d["kwargs"], nodes)
        if d["op"] == "output":
            g.output(args[0])
            continue
        nodes[d["name"]] = g.create_node(d["op"], _resolve(d["target"]), args, kwargs, name=d["name"])
    root = nn.Module()
    for k, spec in data.get("consts", {}).items():
        owner = root
        *path, leaf = k.split(".")
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        owner.register_buffer(leaf, torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"])))
    return fx.GraphModule(root, g)
