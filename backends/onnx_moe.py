"""ONNX translation of transformers' grouped expert matmul (``transformers::grouped_mm_fallback``).

Mixture-of-experts layers in transformers 5 sort the routed tokens by expert and call one opaque custom op::

    Y[s] = X[s] · W[g(s)],   g(s) = #{e : offs[e] ≤ s}   (rows at or past offs[-1] are 0)

with X [S, in] sorted by expert, W [E, in, out] and offs [E] the cumulative token counts. The exporter has
no translation for it, so MoE decoders failed to export. Here it becomes standard ONNX: every expert's
product on every row (``Einsum``, E·S·out values), then each row's own expert (``GatherElements``). The
work is E times the routed product; exact, and what a graph without data-dependent loops can express.
"""
from __future__ import annotations

import torch

__all__ = ["translations"]


def _grouped_mm(x, w, offs):
    from onnxscript import opset18 as op

    rows = op.Range(op.Constant(value_int=0), op.Gather(op.Shape(x), op.Constant(value_int=0), axis=0),
                    op.Constant(value_int=1))                                        # [S]
    offs = op.Cast(offs, to=7)
    past = op.Cast(op.GreaterOrEqual(op.Unsqueeze(rows, [1]), op.Unsqueeze(offs, [0])), to=7)   # [S, E]
    group = op.ReduceSum(past, op.Constant(value_ints=[1]), keepdims=0)             # [S]: g(s)
    n_exp = op.Gather(op.Shape(w), op.Constant(value_int=0), axis=0)
    live = op.Less(group, n_exp)                                                     # rows before offs[-1]
    group = op.Min(group, op.Sub(n_exp, op.Constant(value_int=1)))
    every = op.Einsum(x, w, equation="si,eio->seo")                                 # [S, E, out]
    out_dim = op.Gather(op.Shape(w), op.Constant(value_int=2), axis=0)
    shape = op.Concat(op.Shape(x, end=1), op.Constant(value_ints=[1]), op.Unsqueeze(out_dim, [0]), axis=0)
    index = op.Expand(op.Unsqueeze(group, [1, 2]), shape)                            # [S, 1, out]
    y = op.Squeeze(op.GatherElements(every, index, axis=1), [1])                     # [S, out]
    return op.Where(op.Unsqueeze(live, [1]), y, op.CastLike(op.Constant(value_float=0.0), y))


def translations() -> dict:
    """Custom translations for ``torch.onnx.export`` of the ops transformers registers (empty when absent)."""
    table = {}
    ns = getattr(torch.ops, "transformers", None)
    if ns is not None:
        try:
            table[ns.grouped_mm_fallback.default] = _grouped_mm
        except (AttributeError, RuntimeError):  # not registered in this transformers version
            pass
    return table
