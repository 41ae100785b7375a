"""Recognize attention sites by graph structure and canonicalize each into one ``Attention`` node.

1. Cores: ``aten.scaled_dot_product_attention`` nodes, and hand-written
   ``softmax(q·kᵀ·scale + mask)·v`` (matmul/bmm/baddbmm → scale/mask ops → softmax → matmul).
2. Walk back from q, k, v to their projections (linear / addmm / matmul with a weight), and forward
   from the core output to the output projection.
3. Read the head layout by running *tagged index tensors* through the index ops of each path
   (view, transpose, split, repeat_kv, ...): every element is tagged with (token, projection row),
   so fused qkv, per-head interleaving, GQA repetition and seq-first layouts all reduce to one check.
4. The compute ops between the head split and the core (RoPE, q/k norms) become a ``HeadTransform``
   acting on ``[B, H, S, d]``.
5. Confirm by execution: the canonical op must reproduce the region's output to round-off on the
   example inputs and on inputs of another batch size and sequence length; otherwise the site is a
   refusal with the reason.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import traceback
from typing import Optional

import torch
from torch import fx

from .errors import CaptureError
from .ir import Attention, HeadTransform, SiteInfo, future_keys, hidden

__all__ = ["Refusal", "Match", "find_sites", "run_with_env", "combine_masks", "hidden", "mark_causal_masks"]

aten = torch.ops.aten

# ops that only move, select or rename elements
HEAD_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias",
            "detach", "expand", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "movedim",
            "_reshape_alias", "lift_fresh_copy"}
INDEX_OPS = HEAD_OPS | {"slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow",
                        "getitem", "cat"}
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


# ---- projections --------------------------------------------------------------------------------
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
        return _name_of(node.args[1]), None, True
    if node.op == "call_module":
        return f"{node.target}.weight", f"{node.target}.bias", False
    return None, None, False


WEIGHT_VIEW_OPS = {"getitem", "split", "split_with_sizes", "chunk", "slice", "narrow", "select", "t", "transpose",
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


# ---- tags ---------------------------------------------------------------------------------------
def _run_node_with(node: fx.Node, env: dict, overrides: dict):
    args = fx.map_arg(node.args, lambda a: overrides[a] if a in overrides else env[a])
    kwargs = fx.map_arg(node.kwargs, lambda a: overrides[a] if a in overrides else env[a])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _propagate(path: list, source: fx.Node, source_tag, env: dict) -> dict:
    """Run index ops on tag tensors; other ops pass the tag of a same-shaped input through."""
    tags = {source: source_tag}
    for n in path:
        chain = [a for a in n.all_input_nodes if a in tags]
        name = op_name(n)
        if name in INDEX_OPS and all(tags[a] is not None for a in chain):
            try:
                tags[n] = _run_node_with(n, env, tags)
                continue
            except Exception:  # noqa: BLE001 - an op that cannot run on int tags is opaque
                pass
        val = env.get(n)
        same = [tags[a] for a in chain if isinstance(tags[a], torch.Tensor) and isinstance(val, torch.Tensor)
                and tags[a].shape == val.shape]
        tags[n] = same[0] if same else None
    return tags


@dataclasses.dataclass
class _Layout:
    """How the x tokens are laid out (L) and the sizes it implies."""

    L: str  # "BSD" | "SBD"
    B: int
    S: int

    def tokid(self) -> torch.Tensor:  # (B, S) -> flat token index in x
        b = torch.arange(self.B)[:, None]
        s = torch.arange(self.S)[None, :]
        return b * self.S + s if self.L == "BSD" else s * self.B + b


KINDS = ("BHSD", "BSHD", "(BH)SD", "flat")


def _to_bhsd(t: torch.Tensor, kind: str, lay: _Layout, d: int) -> Optional[torch.Tensor]:
    """Rearrange ``t`` (laid out as ``kind``) to (B, H, S, d); None if the shape does not fit."""
    B, S = lay.B, lay.S
    try:
        if kind == "BHSD" and t.ndim == 4 and t.shape[0] == B and t.shape[2] == S:
            return t
        if kind == "BSHD" and t.ndim == 4 and t.shape[0] == B and t.shape[1] == S:
            return t.transpose(1, 2)
        if kind == "(BH)SD" and t.ndim == 3 and t.shape[0] % B == 0 and t.shape[1] == S:
            return t.reshape(B, -1, S, t.shape[-1])
        if kind == "flat" and t.ndim in (2, 3) and t.shape[-1] % d == 0:
            first, second = (B, S) if lay.L == "BSD" else (S, B)
            if t.ndim == 3 and tuple(t.shape[:2]) != (first, second):
                return None
            u = t.reshape(first, second, -1, d)
            return u.transpose(1, 2) if lay.L == "BSD" else u.permute(1, 2, 0, 3)
    except RuntimeError:
        return None
    return None


def _classify(tag, lay: _Layout, n_rows: int, head_of_row, dpos_of_row, n_heads: int, dh: int):
    """(kind, head ids per position, is_identity) of a tag tensor, or None."""
    if not isinstance(tag, torch.Tensor) or tag.dtype != torch.int64:
        return None
    tok, row = tag // n_rows, tag % n_rows
    head = head_of_row[row]
    dpos = dpos_of_row[row]
    tokid = lay.tokid()
    for kind in KINDS:
        if kind == "flat" and tag.shape[-1] % dh:
            continue
        t_tok = _to_bhsd(tok, kind, lay, dh)
        if t_tok is None:
            continue
        t_head, t_dpos = _to_bhsd(head, kind, lay, dh), _to_bhsd(dpos, kind, lay, dh)
        if t_tok.numel() == 0:  # an empty slice (partial rotary with nothing left to pass through)
            return kind, torch.arange(t_tok.shape[1]), False
        if not torch.equal(t_tok, tokid[:, None, :, None].expand_as(t_tok)):
            continue
        heads = t_head[0, :, 0, 0]
        if not torch.equal(t_head, heads[None, :, None, None].expand_as(t_head)):
            continue
        identity = bool((heads >= 0).all()) and t_dpos.shape[-1] == dh and torch.equal(
            t_dpos, torch.arange(dh).expand_as(t_dpos))
        return kind, heads, identity
    return None


# ---- one q/k/v path ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Proj:
    x: fx.Node
    flattened: bool
    w: torch.Tensor  # [heads, d, D]
    b: Optional[torch.Tensor]
    kv_map: torch.Tensor  # head at each core position
    kind: str  # layout of the core input
    lay: _Layout
    transform: Optional[HeadTransform]
    sides: list
    rope: Optional[str] = None
    rotary_dims: int = 0
    norm: bool = False
    sources: dict = dataclasses.field(default_factory=dict)


def _x_of(gm, proj_node, env):
    x, w, b = _projection(gm, proj_node)
    flattened = False
    xv = env[x]
    if xv.ndim == 2 and op_name(x) in ("view", "reshape", "_unsafe_view") and env[x.args[0]].ndim == 3:
        x, flattened = x.args[0], True
    if env[x].ndim != 3:
        raise _Skip(f"projection input '{x.name}' has shape {tuple(env[x].shape)}; expected (batch, seq, dim)")
    return x, flattened, w, b


def _read_path(gm, core_in: fx.Node, env: dict, role: str) -> _Proj:
    proj = _walk_back_to_projection(gm, core_in)
    x, flattened, w, b = _x_of(gm, proj, env)
    pval = env[proj]
    n_rows = pval.shape[-1]
    ntok = pval.numel() // n_rows
    tag0 = (torch.arange(ntok)[:, None] * n_rows + torch.arange(n_rows)[None, :]).reshape(pval.shape)
    path = _path(proj, core_in)
    tags = _propagate(path, proj, tag0, env)
    d0, d1 = env[x].shape[:2]
    dh = env[core_in].shape[-1]
    found = None
    for lay in (_Layout("BSD", d0, d1), _Layout("SBD", d1, d0)):
        tokid = lay.tokid()
        for kind in ("BHSD", "(BH)SD"):
            t = _to_bhsd(tags[core_in], kind, lay, dh) if isinstance(tags[core_in], torch.Tensor) else None
            if t is None:
                continue
            tok, row = t // n_rows, t % n_rows
            if torch.equal(tok, tokid[:, None, :, None].expand_as(tok)) and torch.equal(
                    row, row[:1, :, :1, :].expand_as(row)):
                found = (lay, kind, row[0, :, 0, :])
                break
        if found:
            break
    if found is None:
        raise _Skip(f"could not read the {role} head layout between '{proj.name}' and '{core_in.name}'")
    lay, kind, r_core = found
    uniq, kv_map = [], []
    for h in range(r_core.shape[0]):
        key = tuple(r_core[h].tolist())
        if key not in uniq:
            uniq.append(key)
        kv_map.append(uniq.index(key))
    R = torch.tensor(uniq)  # [H, dh] projection rows of each head
    head_of_row = torch.full((n_rows,), -1, dtype=torch.long)
    dpos_of_row = torch.zeros(n_rows, dtype=torch.long)
    for h in range(R.shape[0]):
        head_of_row[R[h]] = h
        dpos_of_row[R[h]] = torch.arange(dh)
    wh = w[R]  # [H, dh, D]
    bh = b[R] if b is not None else None
    transform, sides, info = _build_transform(path, proj, tags, env, lay, n_rows, head_of_row, dpos_of_row,
                                              R.shape[0], dh, core_in, role)
    wname, bname, transposed = _projection_sources(proj)
    sources = {"w": (wname, R.reshape(-1), transposed), "b": (bname, R.reshape(-1), False) if bh is not None else None}
    return _Proj(x, flattened, wh, bh, torch.tensor(kv_map), kind, lay, transform, sides, sources=sources, **info)


def _build_transform(path, proj, tags, env, lay, n_rows, head_of_row, dpos_of_row, n_heads, dh, core_in, role):
    """The ops between the head split and the core, replayed on (B, H, S, d) values."""
    cls = {n: _classify(tags[n], lay, n_rows, head_of_row, dpos_of_row, n_heads, dh)
           for n in [proj, *path]}
    g = fx.Graph()
    X = g.placeholder("x")
    cv: dict = {proj: X}  # canonical (B, H, S, d) value of each path node
    kinds: dict = {proj: "flat"}
    sides: list = []
    side_ph: dict = {}
    consts: dict = {}
    replayed = []

    def side(a: fx.Node):
        if a.op == "get_attr":
            key = a.target.replace(".", "_")
            consts[key] = _get_attr_from_env(a, env)
            return g.get_attr(key)
        if a not in side_ph:
            side_ph[a] = g.placeholder(f"side_{len(sides)}")
            sides.append(a)
        return side_ph[a]

    def to_kind(v, kind):
        if kind == "BHSD":
            return v
        if kind == "BSHD":
            return g.call_method("transpose", (v, 1, 2))
        if kind == "(BH)SD":
            return g.call_method("flatten", (v, 0, 1))
        raise _Skip(f"{role} path: an op on a tensor laid out as {kind} cannot be replayed per head")

    def from_kind(v, kind):
        if kind == "BHSD":
            return v
        if kind == "BSHD":
            return g.call_method("transpose", (v, 1, 2))
        b = g.call_method("size", (X, 0))
        return g.call_method("unflatten", (v, 0, (b, -1)))

    for n in path:
        name = op_name(n)
        chain = [a for a in n.all_input_nodes if a in cv]
        c = cls.get(n)
        if name in INDEX_OPS and len(chain) == 1 and (c is None or c[2] or bool((c[1] < 0).any())):
            # a pure rearrangement of the canonical value, an intermediate of one (repeat_kv), or a
            # part of a fused projection that still holds other heads
            cv[n], kinds[n] = cv[chain[0]], (c[0] if c is not None else None)
            continue
        if not chain:
            raise _Skip(f"{role} path: '{n.name}' lost track of the heads")
        scalar = name in SCALAR_OPS and not any(a not in cv for a in n.all_input_nodes)
        if scalar:  # elementwise with Python scalars: layout-free
            new_args = fx.map_arg(n.args, lambda a: cv[a])
            new_kwargs = fx.map_arg(n.kwargs, lambda a: cv[a])
            cv[n] = g.create_node(n.op, n.target, new_args, new_kwargs)
            kinds[n] = kinds[chain[0]]
            replayed.append(name)
            continue
        kind = kinds[chain[0]]
        if any(kinds[a] != kind for a in chain):
            raise _Skip(f"{role} path: '{n.name}' mixes tensors of different head layouts")
        conv = {a: to_kind(cv[a], kind) for a in chain}
        new_args = fx.map_arg(n.args, lambda a: conv[a] if a in conv else side(a))
        new_kwargs = fx.map_arg(n.kwargs, lambda a: conv[a] if a in conv else side(a))
        out = g.create_node(n.op, n.target, new_args, new_kwargs)
        out_kind = c[0] if c is not None else kind
        if out_kind != kind:
            raise _Skip(f"{role} path: '{n.name}' changes the head layout inside a per-head op")
        cv[n], kinds[n] = from_kind(out, kind), kind
        replayed.append(name)
    if not replayed:
        return None, [], {}
    g.output(cv[core_in])
    gm = fx.GraphModule(consts, g)
    info = _describe(path, env, replayed, dh)
    return HeadTransform(gm, len(sides), ", ".join(sorted(set(replayed)))), sides, info


def _get_attr_from_env(node: fx.Node, env: dict):
    return env[node]


def _describe(path, env, replayed, dh) -> dict:
    """RoPE layout and q/k norm, read from the replayed ops."""
    names = set(replayed)
    info: dict = {"rope": None, "rotary_dims": 0, "norm": bool({"rsqrt", "native_layer_norm", "layer_norm",
                                                                  "rms_norm"} & names)}
    if "neg" in names and "cat" in names:
        info["rope"] = "rotate_half"
    elif "neg" in names and ("stack" in names or "flatten" in names):
        info["rope"] = "interleaved"
    if info["rope"]:
        info["rotary_dims"] = dh
        for n in path:
            if op_name(n) == "slice" and n.args[1] in (-1, 3) and len(n.args) > 3 and n.args[2] == 0:
                end = n.args[3]
                if isinstance(end, int) and end < dh and end * 2 != dh:
                    info["rotary_dims"] = min(info["rotary_dims"], end)
    return info


# ---- cores --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Core:
    node: fx.Node  # whose output is the per-head attention output
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: Optional[float]
    causal: bool
    masks: list
    probs: Optional[fx.Node] = None


def _strip_kt(node: fx.Node) -> fx.Node:
    name = op_name(node)
    if name == "transpose":
        dims = {d % 4 if d < 0 else d for d in node.args[1:3]}
        if dims in ({2, 3}, {1, 2}) or set(node.args[1:3]) == {-2, -1}:
            return node.args[0]
    if name == "permute":
        p = list(node.args[1])
        if p[-2:] == [len(p) - 1, len(p) - 2] or p[-2:] == [-1, -2]:
            return node.args[0]
    raise _Skip(f"key of the score matmul is not a transposed tensor ('{node.name}')")


def _scalar(v, env) -> float:
    if isinstance(v, fx.Node):
        t = env[v]
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t)
        if isinstance(t, (int, float)):
            return float(t)
        raise _Skip(f"score scaling by a non-scalar tensor '{v.name}'")
    return float(v)


def _manual_core(sm: fx.Node, env) -> _Core:
    dim = sm.args[1]
    if dim not in (-1, env[sm].ndim - 1):
        raise _Skip("softmax is not over the last dim")
    scale, masks = 1.0, []
    node = sm.args[0]
    seen_scale = False

    def mask_seen():
        if seen_scale:
            raise _Skip("scores are scaled after the mask was applied")

    while True:
        name = op_name(node)
        if name in MATMULS:
            break
        if name in ("_to_copy", "to", "clone", "contiguous"):
            node = node.args[0]
        elif name in ("mul", "div") and isinstance(node.args[0], fx.Node):
            other = node.args[1]
            if isinstance(other, fx.Node) and env[other].numel() != 1:
                raise _Skip(f"scores are multiplied by a tensor '{other.name}'")
            s = _scalar(other, env)
            seen_scale = True
            scale *= s if name == "mul" else 1.0 / s
            node = node.args[0]
        elif name == "add":
            a, b = node.args[0], node.args[1]
            if not isinstance(b, fx.Node):
                raise _Skip("a constant is added to the scores")
            mask_seen()
            masks.append(("additive", b))
            node = a
        elif name == "masked_fill":
            mask_seen()
            masks.append((_hide_kind("drop", _arg(node, 2, "value"), env), node.args[1]))
            node = node.args[0]
        elif name == "where" and isinstance(node.args[1], fx.Node):
            mask_seen()
            masks.append((_hide_kind("keep", node.args[2], env), node.args[0]))
            node = node.args[1]
        else:
            raise _Skip(f"unsupported op '{name}' between the score matmul and softmax")
    mm = node
    name = op_name(mm)
    if name == "baddbmm":
        masks.append(("additive", mm.args[0]))
        scale *= float(mm.kwargs.get("alpha", 1.0))
        if mm.kwargs.get("beta", 1.0) != 1.0:
            raise _Skip("baddbmm with beta != 1")
        q, kt = mm.args[1], mm.args[2]
    else:
        q, kt = mm.args[0], mm.args[1]
    k = _strip_kt(kt)
    # forward: softmax -> (dropout, casts) -> matmul(p, v)
    p = sm
    probs_users = []
    while True:
        users = list(p.users)
        mm_users = [u for u in users if op_name(u) in MATMULS and u.args[0] is p]
        nxt = [u for u in users if op_name(u) in PASS_THROUGH]
        if mm_users:
            pv = mm_users[0]
            probs_users += [u for u in users if u is not pv]
            break
        if len(nxt) >= 1:
            probs_users += [u for u in users if u is not nxt[0]]
            p = nxt[0]
            continue
        raise _Skip("softmax output does not feed a matmul with v")
    core = _Core(pv, q, k, pv.args[1], scale, False, masks[::-1])
    if any(op_name(u) not in ("_assert_tensor_metadata",) for u in probs_users):
        raise _Skip("attention weights are used outside the attention (need_weights=True); "
                    "call the module with need_weights=False")
    return core


def _sdpa_core(node: fx.Node, env) -> _Core:
    mask = _arg(node, 3, "attn_mask")
    scale = _arg(node, 6, "scale")
    causal = bool(_arg(node, 5, "is_causal", False))
    masks = []
    if isinstance(mask, fx.Node):
        masks.append(("keep" if env[mask].dtype == torch.bool else "additive", mask))
    return _Core(node, node.args[0], node.args[1], node.args[2], scale, causal, masks)


def _cores(gm, env) -> list:
    out = []
    for n in gm.graph.nodes:
        name = op_name(n)
        if name == "scaled_dot_product_attention":
            out.append(n)
        elif name in ("_softmax", "softmax") and n.op == "call_function" and _over_two_streams(gm, n):
            out.append(n)
    return out


PRODUCTS = MATMULS | {"einsum"}


def _over_two_streams(gm, sm: fx.Node, budget: int = 32) -> bool:
    """Whether the softmax ``sm`` is over a product of two computed tensors (q·kᵀ): an attention candidate.

    Walks back from the softmax input (at most ``budget`` nodes), stopping at projections with a stored
    weight. An MoE router or a classifier (softmax of ``linear(x, W)``) is not a candidate.
    """
    frontier, seen = [sm.args[0]], set()
    while frontier and len(seen) < budget:
        node = frontier.pop(0)
        if not isinstance(node, fx.Node) or node in seen or node.op in ("get_attr", "placeholder"):
            continue
        seen.add(node)
        if op_name(node) in PRODUCTS:
            operands = [a for a in node.all_input_nodes if a.op != "get_attr"]
            computed = [a for a in operands if _weight_of(gm, a) is None]
            if op_name(node) == "baddbmm":
                computed = [a for a in computed if a is not node.args[0]]
            if len(computed) >= 2:
                return True
            continue
        if _projection(gm, node) is not None:
            continue
        frontier.extend(node.all_input_nodes)
    return False


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


def _output_projection(gm, core: _Core, q: _Proj, env):
    node = core.node
    path = []
    while True:
        users = [u for u in node.users if op_name(u) != "_assert_tensor_metadata"]
        if len(users) != 1:
            raise _Skip(f"attention output '{node.name}' has {len(users)} users; expected one path to the "
                        "output projection")
        u = users[0]
        if _projection(gm, u) is not None and _projection(gm, u)[0] is node:
            break
        if op_name(u) not in HEAD_OPS:
            raise _Skip(f"op '{op_name(u)}' between the attention output and the output projection")
        path.append(u)
        node = u
    o_proj = u
    _, w_o, b_o = _projection(gm, o_proj)
    out = env[core.node]
    dv = out.shape[-1]
    lay = q.lay
    tokid = lay.tokid()
    hq = q.kv_map.numel()
    n_cols = hq * dv
    cols = (torch.arange(hq)[:, None] * dv + torch.arange(dv)[None, :])  # [H, dv]
    tag = tokid[:, None, :, None] * n_cols + cols[None, :, None, :]  # (B, H, S, dv)
    if q.kind == "(BH)SD":
        tag = tag.flatten(0, 1)
    elif q.kind != "BHSD":
        raise _Skip(f"attention output in layout {q.kind}")
    tags = _propagate(path, core.node, tag, env)
    t = tags[path[-1]] if path else tag
    if t is None or t.shape[-1] != n_cols:
        raise _Skip("could not follow the heads from the attention output to the output projection")
    flat = t.reshape(-1, n_cols)
    if not torch.equal(flat // n_cols, torch.arange(flat.shape[0])[:, None].expand_as(flat)):
        raise _Skip("tokens are reordered between the attention output and the output projection")
    colmap = flat[0] % n_cols
    inv = torch.argsort(colmap)
    wo = w_o[:, inv].reshape(w_o.shape[0], hq, dv)
    out_2d = env[o_proj].ndim == 2
    wname, bname, transposed = _projection_sources(o_proj)
    sources = {"wo": (wname, inv, transposed), "bo": (bname, None, False) if b_o is not None else None}
    return o_proj, wo, b_o, out_2d, sources


def _match_site(gm, core_node, env, probe_env) -> Match:
    core = _sdpa_core(core_node, env) if op_name(core_node) == "scaled_dot_product_attention" \
        else _manual_core(core_node, env)
    q = _read_path(gm, core.q, env, "query")
    k = _read_path(gm, core.k, env, "key")
    v = _read_path(gm, core.v, env, "value")
    if not torch.equal(q.kv_map, torch.arange(q.kv_map.numel())):
        raise _Skip("query heads are repeated before the core")
    if v.transform is not None:
        raise _Skip(f"ops on the values before the core ({v.transform.description}) are not supported")
    if k.x is not v.x:
        raise _Skip("keys and values come from different inputs")
    if q.kind != k.kind and core.node.target is not aten.scaled_dot_product_attention.default:
        raise _Skip("query and key use different head layouts")
    hq = q.kv_map.numel()
    k_map, v_map = k.kv_map, v.kv_map
    if k_map.numel() != hq:  # SDPA enable_gqa: the core broadcasts contiguous groups itself
        g = hq // k_map.numel()
        k_map = torch.arange(hq) // g
        v_map = torch.arange(hq) // (hq // v.kv_map.numel())
    o_proj, wo, bo, out_2d, o_sources = _output_projection(gm, core, q, env)
    dh = q.w.shape[1]
    scale = core.scale if core.scale is not None else 1.0 / math.sqrt(dh)
    paths = [_module_path(core.node), _module_path(o_proj)]
    name = _common_prefix(paths)
    info = SiteInfo(name=name, layout=q.lay.L, q_len=q.lay.S, kv_len=k.lay.S, rope=q.rope, rotary_dims=q.rotary_dims,
                    qk_norm=q.norm or k.norm, cross=k.x is not q.x,
                    sources={"wq": q.sources["w"], "bq": q.sources["b"], "wk": k.sources["w"], "bk": k.sources["b"],
                             "wv": v.sources["w"], "bv": v.sources["b"], **o_sources},
                    mask_kind=None if not core.masks else ("bool" if all(m[0] in ("keep", "drop")
                                                                         for m in core.masks) else "additive"))
    op = Attention(q.w, k.w, v.w, wo, q.b, k.b, v.b, bo, k_map, v_map, scale=scale, causal=core.causal,
                   info=info, q_transform=q.transform, k_transform=k.transform)
    sides = q.sides + k.sides
    kv = None if k.x is q.x else k.x
    m = Match(name, op, q.x, kv, core.masks, sides, o_proj, out_2d)
    for e in (env, probe_env):
        if e is None:
            continue
        err, ref = _check(m, e)
        if not err <= 1e-5 * max(1.0, ref):
            raise _Skip(f"the canonical op does not reproduce the region (max abs error {err:.3g} at output "
                        f"scale {ref:.3g})")
    return m


def _hide_kind(kind: str, fill, env) -> str:
    """``kind`` ("keep" | "drop") for a fill of -inf, else ``kind=value``: a finite fill such as
    ``finfo.min`` replaces the scores, so a row with every key hidden averages all values."""
    if isinstance(fill, fx.Node):
        fill = env.get(fill)
        fill = float(fill) if isinstance(fill, torch.Tensor) and fill.numel() == 1 else fill
    if isinstance(fill, (int, float)) and not (math.isinf(fill) and fill < 0):
        return f"{kind}={float(fill)!r}"
    return kind


def combine_masks(kinds: tuple, *masks):
    """One SDPA mask from the masks of a hand-written core: bool (True = keep) or additive float.

    kinds: "additive", "keep"/"drop" (hidden = -inf), "keep=v"/"drop=v" (hidden scores replaced by v), in
    the order the model applies them.
    """
    if len(masks) == 1 and kinds[0] in ("keep", "additive"):
        m = masks[0]
    elif len(masks) == 1 and kinds[0] == "drop":
        m = torch.logical_not(masks[0])
    elif all(k in ("keep", "drop") for k in kinds):
        m = None
        for k, x in zip(kinds, masks):
            keep = x if k == "keep" else torch.logical_not(x)
            m = keep if m is None else (m & keep)
    else:  # additive, in order: a fill replaces what is there (finfo.min absorbs the scores in fp32)
        dtype = next((x.dtype for k, x in zip(kinds, masks) if k == "additive"), torch.float32)
        m = torch.zeros((), dtype=dtype, device=masks[0].device)
        for k, x in zip(kinds, masks):
            if k == "additive":
                m = m + x
            else:
                kind, _, value = k.partition("=")
                keep = x if kind == "keep" else torch.logical_not(x)
                m = torch.where(keep, m, float(value) if value else float("-inf"))
    if m.dim() == 3:
        m = m.unsqueeze(1) if m.shape[0] != 1 else m.unsqueeze(0)
    return m


def _mask_of(m: Match, env) -> Optional[torch.Tensor]:
    masks = [env[n] for _, n in m.masks]
    return combine_masks(tuple(k for k, _ in m.masks), *masks) if masks else None


def _hides_future(mask: torch.Tensor) -> bool:
    """Every key after its query is hidden: ``mask[..., i, j]`` hidden for all ``j > i`` (square masks only)."""
    s = mask.shape[-1]
    if mask.dim() < 2 or mask.shape[-2] != s:
        return False
    return bool(hidden(mask)[..., future_keys(s, mask.device)].all())


def mark_causal_masks(matches: list, envs: list) -> None:
    """Set ``info.causal_mask`` on self-attention sites whose mask hides every later key in all ``envs``.

    Backends may then skip the hidden upper blocks (e.g. the chunked ONNX lowering). ``envs`` should
    include inputs with scrambled values, so that a mask passed in by the caller is not taken for causal.
    """
    for m in matches:
        if m.kv is not None or not m.masks:
            continue
        m.op.info.causal_mask = all(_hides_future(_mask_of(m, e)) for e in envs if e is not None)


def _check(m: Match, env) -> tuple:
    mask = _mask_of(m, env)
    with torch.no_grad():
        y = m.op(env[m.x], env[m.kv] if m.kv is not None else None, mask, *[env[s] for s in m.sides])
        ref = env[m.out_node]
        y = y.reshape(ref.shape)
        return float((y - ref).abs().max()), float(ref.abs().max())


def find_sites(gm: fx.GraphModule, env: dict, probe_env: Optional[dict] = None):
    """(matches, refusals) for every attention core in ``gm``."""
    matches, refusals = [], []
    for core in _cores(gm, env):
        try:
            matches.append(_match_site(gm, core, env, probe_env))
        except _Skip as e:
            refusals.append(Refusal(_module_path(core), str(e), core.name))
        except Exception as e:  # noqa: BLE001 - an unexpected failure is a refusal, never a crash
            at = _failing_node(e) or core
            refusals.append(Refusal(_module_path(core), f"unexpected {type(e).__name__} while reading "
                                                        f"'{at.name}': {_first_line(e)}", at.name))
    return matches, refusals


def _failing_node(e: BaseException) -> Optional[fx.Node]:
    """The graph node the innermost recognition frame on the traceback of ``e`` was working on."""
    found = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_filename != __file__:
            continue
        for key in ("n", "node", "core_in", "start", "sm", "mm"):
            if isinstance(frame.f_locals.get(key), fx.Node):
                found = frame.f_locals[key]
                break
    return found
