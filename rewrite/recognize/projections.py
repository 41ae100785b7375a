"""Projections: affine maps with a stored weight (``linear``, ``addmm``, ``x @ W``), and the paths between nodes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from .common import _arg, _get_attr, _Skip, op_name

def _name_of(node) -> Optional[str]:
    """The stored parameter name of a weight node (None when the weight is a slice of a packed one)."""
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _projection_sources(node: fx.Node):
    """(weight name, bias name, weight stored transposed) of a projection node."""
    name = op_name(node)
    if name == "linear":
        return _name_of(node.args[1]), _name_of(_arg(node, 2, "bias")), False
    if name == "addmm":
        return _name_of(node.args[2]), _name_of(node.args[0]), True
    if name in ("matmul", "mm"):
        w = node.args[1]
        if _is_transpose(w):  # x @ W.T with W stored [out, in] (Falcon's FalconLinear)
            return _name_of(w.args[0]), None, False
        return _name_of(w), None, True
    if node.op == "call_module":
        return f"{node.target}.weight", f"{node.target}.bias", False
    return None, None, False


def _is_transpose(node) -> bool:
    """``node`` is the 2-D transpose of another node: ``W.T``, ``W.t()``, ``W.transpose(0, 1)``, ``W.mT``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    name = op_name(node)
    if name in ("t", "numpy_T"):
        return True
    if name == "transpose":
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    if name == "permute":
        return list(node.args[1]) in ([1, 0], [-1, -2])
    return False


WEIGHT_VIEW_OPS = {"numpy_T", "getitem", "split", "split_with_sizes", "chunk", "slice", "narrow", "select", "t", "transpose",
                   "permute", "view", "reshape", "_unsafe_view", "unflatten", "contiguous", "clone", "detach"}


def _weight_of(gm, node, depth: int = 0):
    """The stored tensor behind ``node``: a get_attr, or a slice/view of one (MHA's packed in_proj)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        t = _get_attr(gm, node.target)
        return t if isinstance(t, torch.Tensor) else None
    if depth > 4 or node.op != "call_function" or op_name(node) not in WEIGHT_VIEW_OPS:
        return None
    values = {}
    for a in node.all_input_nodes:
        v = _weight_of(gm, a, depth + 1)
        if v is None:
            return None
        values[a] = v
    args = fx.map_arg(node.args, values.__getitem__)
    kwargs = fx.map_arg(node.kwargs, values.__getitem__)
    return node.target(*args, **kwargs)


def _projection(gm, node: fx.Node):
    """(input node, weight [out, in], bias or None) if ``node`` is an affine map with a stored weight."""
    name = op_name(node)
    if name == "linear":
        w = _weight_of(gm, node.args[1])
        if w is not None:
            b = _arg(node, 2, "bias")
            return node.args[0], w, _weight_of(gm, b) if b is not None else None
    if name == "addmm":
        w = _weight_of(gm, node.args[2])
        if w is not None:
            return node.args[1], w.t(), _weight_of(gm, node.args[0])
    if name in ("matmul", "mm"):
        w = _weight_of(gm, node.args[1])
        if w is not None and w.ndim == 2:
            return node.args[0], w.t(), None
    if node.op == "call_module":
        mod = _get_attr(gm, node.target)
        if isinstance(mod, torch.nn.Linear):
            return node.args[0], mod.weight, mod.bias
    return None


def _walk_back_to_projection(gm, start: fx.Node, limit: int = 48) -> fx.Node:
    """The nearest projection upstream of ``start`` (breadth-first, stored weights are not followed)."""
    frontier, seen = [start], {start}
    for _ in range(limit):
        nxt = []
        for node in frontier:
            if _projection(gm, node) is not None:
                return node
            for a in node.all_input_nodes:
                if a not in seen and a.op not in ("get_attr", "placeholder"):
                    seen.add(a)
                    nxt.append(a)
        if not nxt:
            break
        frontier = nxt
    raise _Skip(f"no projection with a stored weight feeds '{start.name}'")


def _path(start: fx.Node, end: fx.Node) -> list:
    """Nodes on data-flow paths from ``start`` (excluded) to ``end`` (included), in graph order."""
    back, stack = set(), [end]
    while stack:
        n = stack.pop()
        if n in back or n is start:
            continue
        back.add(n)
        stack.extend(n.all_input_nodes)
    fwd, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in back and u not in fwd:
                fwd.add(u)
                stack.append(u)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(fwd, key=order.__getitem__)
