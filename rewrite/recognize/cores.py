"""Attention cores: SDPA nodes and hand-written ``softmax(q·kᵀ·scale + mask)·v`` with their scale and masks."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import fx

from .common import MATMULS, PASS_THROUGH, _arg, _Skip, op_name
from .masks import _hide_kind
from .modifiers import (VIEWS, _drops_sink, _floor, _heads_view, _peel_scale, _refuse_content_terms, _row_max_of,
                        _scalar, _sinks_of, _softcap_of)
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
    sinks: Optional[torch.Tensor] = None  # one logit per query head (``score_mods.append_sink``)
    sink_source: Optional[str] = None  # the stored tensor they came from
    scores: Optional[fx.Node] = None  # the softmax's input (hand-written cores)


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
    sinks = sink_source = None
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
        elif name == "cat":
            if sinks is not None:
                raise _Skip("two sets of attention sinks on the scores")
            if masks or seen_scale or softcap or flat:
                raise _Skip("the scores are scaled, capped or masked after the attention sinks are joined")
            node, sinks, sink_source = _sinks_of(node, env)
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
    dropped = False
    while True:
        users = list(p.users)
        mm_users = [u for u in users if op_name(u) in MATMULS and u.args[0] is p]
        nxt = [u for u in users if u.args and u.args[0] is p and (op_name(u) in PASS_THROUGH or op_name(u) == "type_as"
                                                                 or (viewed and op_name(u) in VIEWS)
                                                                 or (sinks is not None and not dropped
                                                                     and _drops_sink(u, env)))]
        if mm_users:
            pv = mm_users[0]
            probs_users += [u for u in users if u is not pv]
            break
        if len(nxt) >= 1:
            probs_users += [u for u in users if u is not nxt[0]]
            p = nxt[0]
            dropped = dropped or op_name(p) == "slice"
            continue
        raise _Skip("softmax output does not feed a matmul with v")
    if sinks is not None and not dropped:
        raise _Skip("the attention sinks' column is not dropped from the weights before the matmul with v")
    core = _Core(pv, q, k, pv.args[1], scale, False, masks[::-1], softcap=softcap, sinks=sinks,
                 sink_source=sink_source, scores=sm.args[0])
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
