"""Recognize attention sites by graph structure and canonicalize each into one ``Attention`` node.

1. Cores: ``aten.scaled_dot_product_attention`` nodes, and hand-written
   ``softmax(q·kᵀ·scale + mask)·v`` (matmul/bmm/baddbmm → scale/mask ops → softmax → matmul).
2. Walk back from q, k, v to their projections (linear / addmm / matmul with a weight), and forward
   from the core output to the output projection.
3. Read the head layout by running *tagged index tensors* through the index ops of each path
   (view, transpose, split, repeat_kv, ...): every element is tagged with (token, projection row),
   so fused qkv, per-head interleaving, GQA repetition and seq-first layouts all reduce to one check.
4. The compute ops between the projections and the core (RoPE in every layout, q/k/v norms, also over the
   whole projection) become a ``HeadTransform`` acting on ``[B, H, S, d]``; a gate multiplied onto the
   attention output before W_o becomes the op's ``head_gate`` (``gates``).
5. Confirm by execution: the canonical op must reproduce the region's output to round-off on the
   example inputs and on inputs of another batch size and sequence length; otherwise the site is a
   refusal with the reason.

Stages, one module each: ``cores`` (1), ``projections`` (2), ``layout`` and ``paths`` (3), ``transforms`` and
``rope`` (4), ``gates`` (the output gate), ``masks``, ``modifiers`` (what lies between the score matmul and the
softmax); this module assembles a site and confirms it (5).
"""
from __future__ import annotations

import math
import os
import traceback
from typing import Optional

import torch
from torch import fx

from ..ir import Attention, SiteInfo, hidden
from .common import Match, Refusal, _common_prefix, _first_line, _module_path, _Skip, op_name, run_with_env
from .cores import _cores, _manual_core, _sdpa_core
from .latent import latent_source, match_latent
from .masks import _mask_of, combine_masks, mark_causal_masks
from .paths import _output_projection, _read_path

__all__ = ["Refusal", "Match", "find_sites", "run_with_env", "combine_masks", "hidden", "mark_causal_masks"]

aten = torch.ops.aten
_HERE = os.path.dirname(os.path.abspath(__file__))


def _match_site(gm, core_node, env, probe_env) -> Match:
    core = _sdpa_core(core_node, env) if op_name(core_node) == "scaled_dot_product_attention" \
        else _manual_core(core_node, env)
    latent = latent_source(gm, core, env)
    if latent is not None:  # multi-head latent attention (DeepSeek): its own form
        return match_latent(gm, core, env, latent, lambda m: _confirm(m, env, probe_env))
    q = _read_path(gm, core.q, env, "query")
    k = _read_path(gm, core.k, env, "key")
    v = _read_path(gm, core.v, env, "value")
    if not torch.equal(q.kv_map, torch.arange(q.kv_map.numel())):
        raise _Skip("query heads are repeated before the core")
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
    o_proj, wo, bo, out_2d, o_sources, gate = _output_projection(gm, core, q, env)
    dh = q.w.shape[1]
    scale = core.scale if core.scale is not None else 1.0 / math.sqrt(dh)
    paths = [_module_path(core.node), _module_path(o_proj)]
    name = _common_prefix(paths)
    info = SiteInfo(name=name, layout=q.lay.L, q_len=q.lay.S, kv_len=k.lay.S, rope=q.rope, rotary_dims=q.rotary_dims,
                    qk_norm=q.norm or k.norm, cross=k.x is not q.x,
                    sources={"wq": q.sources["w"], "bq": q.sources["b"], "wk": k.sources["w"], "bk": k.sources["b"],
                             "wv": v.sources["w"], "bv": v.sources["b"], **o_sources,
                             "sink_logits": (core.sink_source, None, False) if core.sink_source else None},
                    mask_kind=None if not core.masks else ("bool" if all(m[0].partition("@")[0] in ("keep", "drop")
                                                                         for m in core.masks) else "additive"))
    sides = q.sides + k.sides + v.sides
    kv = None if k.x is q.x else k.x
    masks = [(k.replace("@H", f"@{hq}"), n) for k, n in core.masks]  # terms of (B·H, Sq, Sk) scores
    m = Match(name, None, q.x, kv, masks, sides, o_proj, out_2d)
    bias_map = _bias_rows(m, env, hq)
    m.op = Attention(q.w, k.w, v.w, wo, q.b, k.b, v.b, bo, k_map, v_map, scale=scale, causal=core.causal,
                     info=info, q_transform=q.transform, k_transform=k.transform, v_transform=v.transform,
                     bias_map=bias_map, softcap=core.softcap, sink_logits=core.sinks)
    m.op.head_gate = gate  # the model's own output gate (rewrite.output_gate), or None
    _confirm(m, env, probe_env)
    return m


def _confirm(m: Match, env, probe_env) -> None:
    """The canonical op reproduces the region on the example and the probe inputs, or the site is refused."""
    for e in (env, probe_env):
        if e is None:
            continue
        err, ref = _check(m, e)
        if not err <= 1e-5 * max(1.0, ref):
            raise _Skip(f"the canonical op does not reproduce the region (max abs error {err:.3g} at output "
                        f"scale {ref:.3g})")


def _bias_rows(m: Match, env, hq: int) -> Optional[torch.Tensor]:
    """``arange(Hq)`` when the site's mask has a head axis (a per-query-head bias such as ALiBi or a relative
    position bias: head-count passes must slice it with the query heads), None when all heads share it."""
    mask = _mask_of(m, env)
    if mask is None or mask.dim() != 4 or mask.shape[1] == 1:
        return None
    if mask.shape[1] != hq:
        raise _Skip(f"the mask has {mask.shape[1]} head rows for {hq} query heads")
    return torch.arange(hq)


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
        if os.path.dirname(os.path.abspath(frame.f_code.co_filename)) != _HERE:
            continue
        for key in ("n", "node", "core_in", "start", "sm", "mm"):
            if isinstance(frame.f_locals.get(key), fx.Node):
                found = frame.f_locals[key]
                break
    return found
