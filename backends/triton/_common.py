"""Input validation and launch heuristics shared by the Triton attention kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    return not isinstance(kernel, JITFunction)


@triton.jit
def program_heads(pid_bh, Hq, KMAP, VMAP):
    """(batch, query head, key head, value head) of a program over ``batch * Hq``; int64 for addressing."""
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    return b, h, tl.load(KMAP + h), tl.load(VMAP + h)


def new_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(out ``[B, Hq, Sq, dv]`` in q's dtype, done): done when there is nothing to launch (empty, or no keys → 0)."""
    out = torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out, True
    if k.shape[2] == 0:
        return out.zero_(), True
    return out, False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact-fp32 (``ieee``) products; half inputs use the tensor-core path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(d: int) -> int:
    """Power-of-two register block covering a head dimension (>= 16 for ``tl.dot``)."""
    return max(16, triton.next_power_of_2(d))


def check_qkv(q, k, v, *, kernel) -> None:
    """Shape/dtype/device checks for ``q [B,Hq,Sq,dh]``, ``k [B,Hk,Sk,dh]``, ``v [B,Hv,Sk,dv]``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} has unsupported dtype {t.dtype}; expected float32, float16 or bfloat16"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if kernel is not None and not is_interpreted(kernel) and q.device.type == "cpu":
        raise ValueError(
            "q is a CPU tensor; the Triton kernels need GPU tensors (or TRITON_INTERPRET=1)"
        )
    B, _, _, dh = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k batch size {k.shape[0]} does not match q batch size {B}")
    if v.shape[0] != B:
        raise ValueError(f"v batch size {v.shape[0]} does not match q batch size {B}")
    if k.shape[3] != dh:
        raise ValueError(f"k head_dim {k.shape[3]} does not match q head_dim {dh}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v sequence length {v.shape[2]} does not match k sequence length {k.shape[2]}")
    if not 1 <= dh <= MAX_HEAD_DIM:
        raise ValueError(f"q head_dim {dh} must be in [1, {MAX_HEAD_DIM}]")
    if not 1 <= v.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"v head_dim {v.shape[3]} must be in [1, {MAX_HEAD_DIM}]")


def check_map(name: str, m, n_query_heads: int, n_heads: int, source: str, device) -> torch.Tensor:
    """Validate a head map (query head i reads ``source`` head ``m[i]``); return int64 on ``device``."""
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor, got {type(m).__name__}")
    if m.dtype.is_floating_point or m.dtype.is_complex or m.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {m.dtype}")
    if m.dim() != 1 or m.shape[0] != n_query_heads:
        raise ValueError(
            f"{name} must have length Hq={n_query_heads} (one entry per query head), "
            f"got shape {tuple(m.shape)}"
        )
    if m.numel():
        lo, hi = int(m.min()), int(m.max())  # one host sync per map
        if lo < 0 or hi >= n_heads:
            raise ValueError(
                f"{name} index out of range: entries must be in [0, {n_heads}) "
                f"({source} has {n_heads} heads), got min {lo}, max {hi}"
            )
    return m.to(device=device, dtype=torch.int64).contiguous()
