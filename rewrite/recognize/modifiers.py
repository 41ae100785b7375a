"""Score modifiers as recognition reads them, between the score matmul and the softmax (``cores._manual_core``).

- ``_softcap_of``: ``c·tanh(s / c)``; ``_peel_scale`` / ``_scalar``: scalar factors (also on ``kᵀ``);
- ``_heads_view``: views between ``(B·H, Sq, Sk)`` and ``(B, H, Sq, Sk)`` scores;
- shifts that leave the softmax unchanged: ``_row_max_of`` (s − max_j s), ``_floor`` (max(s, finfo.min));
- ``_sinks_of``: attention sinks, ``cat([s, σ_h], -1)`` with one stored logit per head (gpt-oss), and
  ``_drops_sink``: the slice that drops their column after the softmax;
- ``_refuse_content_terms``: a score term built from the site's own queries or keys (DeBERTa's c2p/p2c) is
  refused by name; only terms of positions and masks become the op's bias (``rewrite.score_mods``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx

from .common import _arg, _Skip, op_name


def _scalar(v, env) -> float:
    if isinstance(v, fx.Node):
        t = env[v]
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t)
        if isinstance(t, (int, float)):
            return float(t)
        raise _Skip(f"score scaling by a non-scalar tensor '{v.name}'")
    return float(v)


VIEWS = {"view", "reshape", "_unsafe_view"}


def _softcap_of(node: fx.Node, env) -> Optional[tuple]:
    """``(c, s)`` when ``node`` is ``c·tanh(s / c)`` (``s·(1/c)`` accepted), else None."""
    if op_name(node) != "mul":
        return None
    a, b = node.args[0], node.args[1]
    t, c = (a, b) if isinstance(a, fx.Node) and op_name(a) == "tanh" else (b, a)
    if not (isinstance(t, fx.Node) and op_name(t) == "tanh") or isinstance(c, fx.Node):
        return None
    inner = t.args[0]
    if not isinstance(inner, fx.Node) or op_name(inner) not in ("div", "mul") or isinstance(inner.args[1], fx.Node):
        raise _Skip("'tanh' between the score matmul and softmax is not a soft-cap c·tanh(s/c)")
    inv = float(inner.args[1]) if op_name(inner) == "div" else 1.0 / float(inner.args[1])
    if not math.isclose(inv, float(c), rel_tol=1e-6):
        raise _Skip(f"'tanh' soft-cap divides by {inv:g} but multiplies by {float(c):g}")
    return float(c), inner.args[0]


def _heads_view(node: fx.Node, env) -> Optional[str]:
    """"split" when ``node`` views ``(B·H, Sq, Sk)`` scores as ``(B, H, Sq, Sk)``, "merge" the other way,
    "same" for a view that keeps the shape, else None."""
    src, out = env[node.args[0]], env[node]
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if tuple(src.shape) == tuple(out.shape):
        return "same"
    flat, full = (src, out) if src.dim() == 3 else (out, src)
    if flat.dim() == 3 and full.dim() == 4 and flat.shape[0] == full.shape[0] * full.shape[1] \
            and tuple(flat.shape[1:]) == tuple(full.shape[2:]):
        return "split" if src.dim() == 3 else "merge"
    return None


SINK_PATH = VIEWS | {"expand", "unsqueeze", "_to_copy", "to", "clone", "contiguous", "alias", "detach", "repeat"}


def _sinks_of(node: fx.Node, env) -> tuple:
    """``(s, σ [H], stored name)`` of ``cat([s, σ_h broadcast to (B, H, Sq, 1)], -1)``: a learned logit per
    head joining every softmax row. Sinks computed from anything but one stored tensor are refused."""
    parts, dim = node.args[0], _arg(node, 1, "dim", 0)
    if len(parts) != 2 or not all(isinstance(p, fx.Node) for p in parts) or dim not in (-1, env[node].dim() - 1):
        raise _Skip("scores are concatenated with something other than one sink logit per row")
    s, sink = parts
    scores, value = env[s], env[sink]
    if scores.dim() != 4 or value.dim() != 4 or value.shape[-1] != 1 or value.shape[1] != scores.shape[1]:
        raise _Skip(f"scores are concatenated with a tensor of shape {tuple(value.shape)}, not one sink logit "
                    "per head and row")
    per_head = value[0, :, 0, 0]
    if not torch.equal(value, per_head.reshape(1, -1, 1, 1).expand_as(value)):
        raise _Skip("attention sinks that differ between rows or batch entries (not one logit per head)")
    root = sink
    while root.op == "call_function" and op_name(root) in SINK_PATH:
        root = root.args[0]
    if root.op != "get_attr":
        raise _Skip(f"attention sinks computed from '{root.name}' (only a stored logit per head is supported)")
    return s, per_head.detach().clone(), root.target


CASTS = {"_to_copy", "to", "type_as", "unsqueeze", "view", "reshape", "alias", "detach"}


def _lse_sinks_of(scale: fx.Node, scores: Optional[fx.Node], env) -> Optional[tuple]:
    """``(σ [H], stored name)`` when ``scale`` is ``sigmoid(logsumexp_j(s) − σ_h)`` of the core's own scores ``s``
    (Granite-SWA): multiplying softmax(s)·v by it is attention with sinks, ``softmax([s, σ_h])[..., :-1]·v``.
    None for any other factor."""
    node = scale
    while isinstance(node, fx.Node) and op_name(node) in CASTS:
        node = node.args[0]
    if scores is None or not isinstance(node, fx.Node) or op_name(node) != "sigmoid":
        return None
    node = node.args[0]
    while isinstance(node, fx.Node) and op_name(node) in CASTS:
        node = node.args[0]
    if not isinstance(node, fx.Node) or op_name(node) != "sub":
        return None
    lse, sink = node.args[0], node.args[1]
    while isinstance(lse, fx.Node) and op_name(lse) in CASTS:
        lse = lse.args[0]
    if not (isinstance(lse, fx.Node) and op_name(lse) == "logsumexp" and lse.args[0] is scores
            and tuple(_arg(lse, 1, "dim", ())) in ((-1,), (env[scores].dim() - 1,))):
        return None
    root = sink
    while isinstance(root, fx.Node) and root.op == "call_function" and op_name(root) in SINK_PATH:
        root = root.args[0]
    if not isinstance(root, fx.Node) or root.op != "get_attr":
        return None
    value = env[root].detach().reshape(-1)
    return (value.clone(), root.target) if value.numel() == env[scores].shape[1] else None


def _drops_sink(node: fx.Node, env) -> bool:
    """``node`` is ``p[..., :-1]`` (or ``p[..., :Sk]``): the slice dropping the sink column of the weights."""
    if op_name(node) != "slice" or _arg(node, 1, "dim", 0) not in (-1, env[node.args[0]].dim() - 1):
        return False
    start, end = _arg(node, 2, "start", 0), _arg(node, 3, "end", None)
    return start in (0, None) and end in (-1, env[node.args[0]].shape[-1] - 1)


def _row_max_of(m, s: fx.Node) -> bool:
    """``m`` is ``max(s, -1, keepdim=True)`` (values, or ``amax``), perhaps detached: a per-row shift of ``s``."""
    while isinstance(m, fx.Node) and op_name(m) in ("detach", "alias", "_to_copy", "to"):
        m = m.args[0]
    if isinstance(m, fx.Node) and op_name(m) == "getitem" and m.args[1] == 0:
        m = m.args[0]
    if not (isinstance(m, fx.Node) and op_name(m) in ("max", "amax") and m.args[0] is s):
        return False
    dim = _arg(m, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    return dim == -1 and bool(_arg(m, 2, "keepdim", False))


def _floor(v, env) -> bool:
    """A scalar at or below -1e30 (``finfo(float32).min``): flooring scores at it changes no visible score."""
    v = env.get(v) if isinstance(v, fx.Node) else v
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return False
        v = float(v)
    return isinstance(v, (int, float)) and v <= -1e30


def _peel_scale(node: fx.Node, env) -> tuple:
    """(node under scalar mul/div ops, their factor): the ``kᵀ / √d`` some models scale instead of q·kᵀ."""
    factor = 1.0
    while op_name(node) in ("mul", "div") and isinstance(node.args[0], fx.Node):
        other = node.args[1]
        if isinstance(other, fx.Node) and getattr(env.get(other), "numel", lambda: 2)() != 1:
            break
        s = _scalar(other, env)
        factor *= s if op_name(node) == "mul" else 1.0 / s
        node = node.args[0]
    return node, factor


SHAPE_ONLY = {"sym_size", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones",
              "new_full", "new_empty"}  # read only the shape of their tensor input


def _refuse_content_terms(masks: list, q: fx.Node, k: fx.Node, budget: int = 4000) -> None:
    """A score term computed from this site's queries or keys (DeBERTa's c2p/p2c) is not a bias of positions."""
    stop = {q, k}
    for _, start in masks:
        frontier, seen = [start], set()
        while frontier and len(seen) < budget:
            n = frontier.pop()
            if n in seen or not isinstance(n, fx.Node):
                continue
            if n in stop:
                raise _Skip("disentangled content-to-position attention (a score term computed from the queries "
                            "or keys, as in DeBERTa's c2p/p2c) is not supported")
            seen.add(n)
            name = op_name(n)
            if name in SHAPE_ONLY:
                continue
            frontier.extend([n.args[0]] if name in ("expand_as", "view_as", "reshape_as") else n.all_input_nodes)
