"""Per-head transforms: the compute ops between the head split and the core (RoPE, q/k norms), replayed on
``[B, H, S, d]`` values as a ``HeadTransform``."""
from __future__ import annotations

from torch import fx

from ..ir import HeadTransform
from .common import INDEX_OPS, SCALAR_OPS, _Skip, op_name
from . import layout

def _build_transform(path, proj, tags, env, lay, n_rows, head_of_row, dpos_of_row, n_heads, dh, core_in, role):
    """The ops between the head split and the core, replayed on (B, H, S, d) values."""
    cls = {n: layout._classify(tags[n], lay, n_rows, head_of_row, dpos_of_row, n_heads, dh)
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
