"""Attention cores: SDPA nodes and hand-written ``softmax(q·kᵀ·scale + mask)·v`` with their scale and masks."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import fx

from .common import MATMULS, PASS_THROUGH, _arg, _Skip, op_name
from .masks import _hide_kind
from .projections import _projection, _weight_of

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
    softcap: float = 0.0


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


def _manual_core(sm: fx.Node, env) -> _Core:
    """``softmax(c·tanh(q·kᵀ·scale / c) + masks) · v``, reading back from the softmax ``sm``:

    scalar scales, additive terms and fills (also in place: ``add_``, ``masked_fill_``), a soft-cap, scalar
    constants and the row maximum (softmax(s + a) = softmax(s)), a floor at ``finfo.min``, views of ``(B·H, Sq, Sk)`` scores as ``(B, H, Sq, Sk)`` (terms
    added before the view are marked ``@H`` and unflattened by ``combine_masks``), and ``baddbmm``'s bias.
    """
    dim = sm.args[1]
    if dim not in (-1, env[sm].ndim - 1):
        raise _Skip("softmax is not over the last dim")
    scale, masks, softcap = 1.0, [], 0.0
    node = sm.args[0]
    flat = env[node].dim() == 3  # the scores walked are (B·H, Sq, Sk), not (B, H, Sq, Sk)
    viewed = flat
    seen_scale = False

    def mask_seen():
        if seen_scale:
            raise _Skip("scores are scaled after the mask was applied")
        if softcap:
            raise _Skip("a mask is added before the tanh soft-cap")

    def kind(k: str) -> str:
        return f"{k}@H" if flat else k  # H: the site's query heads (``_match_site`` writes the number)

    while True:
        name = op_name(node)
        if name in MATMULS:
            break
        capped = _softcap_of(node, env) if name == "mul" else None
        if capped is not None:
            if softcap:
                raise _Skip("two tanh soft-caps on the scores")
            softcap = capped[0] * scale  # a·c·tanh(b·s/c) = c'·tanh(a·b·s/c') with c' = a·c
            node = capped[1]
        elif name in ("_to_copy", "to", "clone", "contiguous"):
            node = node.args[0]
        elif name in VIEWS:
            form = _heads_view(node, env)
            if form is None:
                raise _Skip(f"scores are reshaped ('{node.name}') other than between (B·H, Sq, Sk) and "
                            "(B, H, Sq, Sk)")
            flat, viewed = flat if form == "same" else form == "split", True
            node = node.args[0]
        elif name == "sub" and _row_max_of(node.args[1], node.args[0]):
            if softcap:
                raise _Skip("the row maximum is subtracted inside the tanh soft-cap")
            node = node.args[0]  # s − max_j s: softmax(s − a_i) = softmax(s) for a shift a_i per query row
        elif name in ("max", "maximum", "clamp_min") and len(node.args) == 2 and _floor(node.args[1], env):
            node = node.args[0]  # max(s, finfo.min): keeps every score a mask does not hide
        elif name in ("mul", "div") and isinstance(node.args[0], fx.Node):
            other = node.args[1]
            if isinstance(other, fx.Node) and env[other].numel() != 1:
                raise _Skip(f"scores are multiplied by a tensor '{other.name}'")
            s = _scalar(other, env)
            seen_scale = True
            scale *= s if name == "mul" else 1.0 / s
            node = node.args[0]
        elif name in ("add", "add_"):
            a, b = node.args[0], node.args[1]
            if not isinstance(a, fx.Node):
                a, b = b, a
            if not isinstance(b, fx.Node) or env[b].numel() == 1:
                if softcap:
                    raise _Skip("a constant is added to the scores inside the tanh soft-cap")
                node = a  # a constant shift: softmax(s + a) = softmax(s)
                continue
            if node.kwargs.get("alpha", 1) != 1:
                raise _Skip("a term is added to the scores with alpha != 1")
            mask_seen()
            masks.append((kind("additive"), b))
            node = a
        elif name in ("masked_fill", "masked_fill_"):
            mask_seen()
            masks.append((kind(_hide_kind("drop", _arg(node, 2, "value"), env)), node.args[1]))
            node = node.args[0]
        elif name == "where" and isinstance(node.args[1], fx.Node):
            mask_seen()
            masks.append((kind(_hide_kind("keep", node.args[2], env)), node.args[0]))
            node = node.args[1]
        else:
            raise _Skip(f"unsupported op '{name}' between the score matmul and softmax")
    mm = node
    name = op_name(mm)
    if name == "baddbmm":
        if softcap:
            raise _Skip("a baddbmm bias is added before the tanh soft-cap")
        masks.append((kind("additive"), mm.args[0]))
        scale *= float(mm.kwargs.get("alpha", 1.0))
        if mm.kwargs.get("beta", 1.0) != 1.0:
            raise _Skip("baddbmm with beta != 1")
        q, kt = mm.args[1], mm.args[2]
    else:
        q, kt = mm.args[0], mm.args[1]
    kt, factor = _peel_scale(kt, env)
    scale *= factor
    k = _strip_kt(kt)
    _refuse_content_terms(masks, q, k)
    # forward: softmax -> (dropout, casts, the inverse view) -> matmul(p, v)
    p = sm
    probs_users = []
    while True:
        users = list(p.users)
        mm_users = [u for u in users if op_name(u) in MATMULS and u.args[0] is p]
        nxt = [u for u in users if u.args and u.args[0] is p and (op_name(u) in PASS_THROUGH or op_name(u) == "type_as"
                                                                 or (viewed and op_name(u) in VIEWS))]
        if mm_users:
            pv = mm_users[0]
            probs_users += [u for u in users if u is not pv]
            break
        if len(nxt) >= 1:
            probs_users += [u for u in users if u is not nxt[0]]
            p = nxt[0]
            continue
        raise _Skip("softmax output does not feed a matmul with v")
    core = _Core(pv, q, k, pv.args[1], scale, False, masks[::-1], softcap=softcap)
    if any(op_name(u) not in ("_assert_tensor_metadata",) for u in probs_users):
        raise _Skip("attention weights are used outside the attention (need_weights=True); "
                    "call the module with need_weights=False")
    return core


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
