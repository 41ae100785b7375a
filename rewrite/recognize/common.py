"""Shared vocabulary of recognition: op names and sets, the result records, and running the captured graph."""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
from torch import fx

from ..errors import CaptureError
from ..ir import Attention

# ops that only move, select or rename elements
HEAD_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias",
            "detach", "expand", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "movedim",
            "_reshape_alias", "lift_fresh_copy"}


INDEX_OPS = HEAD_OPS | {"slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow",
                        "getitem", "cat", "stack", "index"}


SCALAR_OPS = {"mul", "div", "add", "sub", "_to_copy", "to", "type_as"}


PASS_THROUGH = {"dropout", "_to_copy", "to", "clone", "contiguous", "alias", "detach", "native_dropout"}


MATMULS = {"matmul", "bmm", "baddbmm", "mm"}


def op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op if node.op != "call_method" else str(node.target)
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(node.target, "__name__", str(node.target))


@dataclasses.dataclass
class Refusal:
    """A site that was found but not canonicalized, with the reason."""

    name: str
    reason: str
    node: str = ""

    def __str__(self):
        return f"{self.name or '<top>'}: {self.reason}"


@dataclasses.dataclass
class Match:
    """A recognized site ready to be put into the graph."""

    name: str
    op: Attention
    x: fx.Node
    kv: Optional[fx.Node]
    masks: list  # (kind, node) with kind "keep" | "drop" | "additive"
    sides: list  # side-input nodes of the head transforms
    out_node: fx.Node  # the output projection node the op replaces
    out_2d: bool  # the output projection gave (tokens, D) instead of x's 3D layout


class _Skip(Exception):
    pass


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Recorder(fx.Interpreter):
    """An interpreter that keeps every value and knows the node it is running."""

    current: Optional[fx.Node] = None

    def run_node(self, n):
        self.current = n
        return super().run_node(n)


def run_with_env(gm: fx.GraphModule, flat: list) -> dict:
    """Run ``gm`` keeping every intermediate value: node -> value.

    A failure becomes a ``CaptureError`` naming the module and the node that failed.
    """
    interp = _Recorder(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            interp.run(*flat)
    except Exception as e:  # noqa: BLE001 - any failure of the captured graph is a capture failure
        n = interp.current
        where = (f" in module '{_module_path(n) or '<top>'}' at '{n.name}'") if n is not None else ""
        raise CaptureError(f"the captured graph failed{where}: {type(e).__name__}: {_first_line(e)}. "
                           "Fix: pass example inputs of the shapes and dtypes the model is called with") from e
    return interp.env


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _common_prefix(paths: list) -> str:
    parts = [p.split(".") for p in paths if p is not None]
    if not parts:
        return ""
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)
