"""RoPE layout of a head transform, read by execution rather than from op names.

A rotary embedding is, at every position p, a linear map M_p of a head's d features that turns pairs of dims
(i, j) by an angle θ_p and leaves the other dims alone. Running the transform on the basis vectors
x_h = e_h (one "head" per basis vector) gives the columns of M_p for every position at once:

    M_p[i, h] = T(e_h)[i]      (B, H = d, S, d) -> (B, d, S, d)

Dims whose column is supported off the diagonal at some position are rotary; each must have exactly one
partner. The pairs name the layout:

- ``rotate_half``: (j, j + r/2) for j < r/2 (LLaMA, GPT-NeoX: ``cat(-x2, x1)``);
- ``interleaved``: (2j, 2j + 1) for j < r/2 (GPT-J ``rotate_every_two``, ``stack(...).flatten(-2)``,
  ``view_as_complex``);
- ``other``: any other pairing, or a block that is not a rotation [[a, -b], [b, a]] (passes that must commute
  with the rotation refuse to rotate such heads).

r (``rotary_dims``) counts the rotary dims; they must come first (partial rotary: the rest pass through).
A q/k norm scales every basis vector alike (they share one RMS), so the pairs read the same with a norm;
the rotation-form check is made only when the transform is linear.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["rope_layout", "is_linear"]


def _basis(b: int, s: int, d: int, dtype) -> torch.Tensor:
    """x[b, h, s, :] = e_h: (B, d, S, d)."""
    return torch.eye(d, dtype=dtype)[None, :, None, :].expand(b, d, s, d).contiguous()


def rope_layout(transform, sides: list, b: int, s: int, d: int, dtype=torch.float32) -> tuple:
    """(layout, rotary_dims) of ``transform`` on (B, H, S, d) with its side inputs; (None, 0) if it rotates
    nothing (a norm alone) or cannot be probed."""
    heads = getattr(transform, "heads", None)
    with torch.no_grad():
        try:
            if heads is None:
                x = _basis(b, s, d, dtype)
                y = transform(x, *sides)
            else:  # runs at its own head count only: head h of run r holds e_j, j = r·H + h (mod d)
                runs = -(-d // heads)
                j = (torch.arange(runs)[:, None] * heads + torch.arange(heads)[None, :]) % d  # [runs, H]
                eye = torch.eye(d, dtype=dtype)
                y = torch.empty(b, d, s, d, dtype=dtype)
                for r in range(runs):
                    out = transform(eye[j[r]][None, :, None, :].expand(b, heads, s, d).contiguous(), *sides)
                    y[:, j[r]] = out  # (B, H, S, d): the column of each basis vector it held
                x = _basis(b, s, d, dtype)
        except Exception:  # noqa: BLE001 - a transform that cannot run on d heads is not read
            return None, 0
        if y.shape != x.shape:
            return None, 0
        m = y.permute(0, 2, 3, 1).double()  # (B, S, i, h): M_p[i, h]
    tol = 1e-6 * float(m.abs().max().clamp_min(1e-30))
    support = (m.abs() > tol).flatten(0, 1).any(0)  # [i, h]
    off = support & ~torch.eye(d, dtype=torch.bool)
    rotary = off.any(0)
    if not bool(rotary.any()):
        return None, 0
    r = int(rotary.sum())
    pairs = _pairs(off, rotary)
    if pairs is None or not bool(rotary[:r].all()):
        return "other", r
    half = torch.arange(r // 2)
    layout = None
    if pairs == {(int(j), int(j) + r // 2) for j in half}:
        layout = "rotate_half"
    elif pairs == {(2 * int(j), 2 * int(j) + 1) for j in half}:
        layout = "interleaved"
    if layout is None or (is_linear(transform, sides, b, s, d, dtype) and not _rotations(m, pairs, _atol(dtype))):
        return "other", r
    return layout, r


def _pairs(off: torch.Tensor, rotary: torch.Tensor) -> Optional[set]:
    """{(i, j), i < j} when every rotary dim mixes with exactly one other, symmetrically; else None."""
    pairs = set()
    for h in rotary.nonzero().flatten().tolist():
        partners = off[:, h].nonzero().flatten().tolist()
        if len(partners) != 1 or not bool(off[h, partners[0]]):
            return None
        pairs.add((min(h, partners[0]), max(h, partners[0])))
    return pairs


def _atol(dtype) -> float:
    """Round-off of the probe: 1e-5 in fp32, a few ulps in bf16/fp16 (a norm or a non-rotation is off by O(1))."""
    return max(1e-5, 4 * torch.finfo(dtype).eps)


def is_linear(transform, sides, b, s, d, dtype) -> bool:
    """T(u + 2v) = T(u) + 2 T(v) on random inputs, to the dtype's round-off (false with a q/k norm)."""
    g = torch.Generator().manual_seed(0)
    u, v = (torch.randn(b, getattr(transform, "heads", None) or 2, s, d, generator=g, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        lhs, rhs = transform(u + 2 * v, *sides), transform(u, *sides) + 2 * transform(v, *sides)
    return bool(((lhs - rhs).abs() <= 10 * _atol(dtype) * (1 + rhs.abs())).all())


def _rotations(m: torch.Tensor, pairs: set, atol: float = 1e-5) -> bool:
    """Every pair's 2×2 block of M_p is a rotation [[a, -b], [b, a]] with a² + b² = 1, at every position."""
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    a, b = m[..., i, i], m[..., j, i]
    ok = torch.allclose(m[..., j, j], a, atol=atol) and torch.allclose(m[..., i, j], -b, atol=atol)
    return ok and torch.allclose(a * a + b * b, torch.ones_like(a), atol=atol)
