"""Verify: compare a stage with the original on the same inputs; name the first diverging site."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree

from .graph import sites

__all__ = ["Comparison", "compare_outputs", "site_errors", "first_divergence"]


@dataclasses.dataclass
class Comparison:
    max_abs_err: float
    scale: float  # max |reference|
    cosine: float

    @property
    def relative(self) -> float:
        return self.max_abs_err / max(self.scale, 1e-12)


def _leaves(out) -> list:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]


def compare_outputs(reference: Callable, candidate: Callable, batches: list) -> Comparison:
    """Max abs error and cosine over every floating output of every batch (kwargs dicts)."""
    err, scale, dots, na, nb = 0.0, 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for kw in batches:
            ra, ca = _leaves(reference(kw)), _leaves(candidate(kw))
            if len(ra) != len(ca):
                raise ValueError(f"output structure differs: {len(ra)} vs {len(ca)} tensors")
            for a, b in zip(ra, ca):
                a, b = a.double(), b.double().reshape(a.shape)
                err = max(err, float((a - b).abs().max()))
                scale = max(scale, float(a.abs().max()))
                dots += float((a * b).sum())
                na += float((a * a).sum())
                nb += float((b * b).sum())
    cos = dots / max((na * nb) ** 0.5, 1e-30)
    return Comparison(err, scale, cos)


def _record_site_inputs(gm, call: Callable, kw) -> list:
    """Run ``gm`` and keep the (args, output) of each canonical site."""
    records = []
    hooks = [op.register_forward_hook(lambda m, a, o, i=i: records.append((i, a, o)))
             for i, op in enumerate(sites(gm))]
    try:
        with torch.no_grad():
            call(kw)
    finally:
        for h in hooks:
            h.remove()
    return sorted(records, key=lambda r: r[0])


def site_errors(reference_gm, reference_call: Callable, candidate_gm, batches: list) -> list:
    """Per site: max abs error of the candidate's op against the reference's, on the reference's inputs."""
    ref_ops, new_ops = sites(reference_gm), sites(candidate_gm)
    errs = [0.0] * len(new_ops)
    if len(ref_ops) != len(new_ops):
        return errs
    with torch.no_grad():
        for kw in batches:
            for i, args, out in _record_site_inputs(reference_gm, reference_call, kw):
                y = new_ops[i](*args)
                errs[i] = max(errs[i], float((y.double() - out.double()).abs().max()))
    return errs


def first_divergence(names: list, errors: list, tol: float) -> Optional[str]:
    for name, e in zip(names, errors):
        if e > tol:
            return f"{name} (max abs error {e:.3g})"
    return None
