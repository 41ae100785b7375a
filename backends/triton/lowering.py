"""Triton lowering: each site's attention core runs in the fused Triton kernels.

    core(q, k, v, mask) = attention_forward(q, k, v; k_map, v_map, scale, causal, key_padding, clip, head_scale)
                        | linear_attention_forward(q, k, v; k_map, v_map, causal, eps)       (kind == "linear")

Projections, RoPE/q-k norms, gates and the output projection stay in PyTorch.

Handled:
 1. softmax (``score_fn`` None), any k_map/v_map (MHA, GQA, DHA) read in the kernel, no KV repeat;
 2. clipped softmax: a ``score_fn`` with ``zeta`` and ``gamma`` attributes → ``clip=(zeta, gamma)``;
 3. linear attention: a ``score_fn`` with ``kind == "linear"`` (ReLU feature map, ``eps``); not the
   sliding-window + linear hybrid (``lit{window=W}``, refused by name);
 4. head gates (``head_gate``) → ``head_scale`` (softmax) or a product after the kernel (linear);
 5. masks: None (``op.causal``), or bool / additive (0 or ≤ -1e4) masks that are exactly a key padding
    mask, optionally with a causal triangle: ``mask[b, i, j] = pad[b, j] ∧ (j ≤ i + Sk - Sq)``;
 6. per-head spans (``op.window``/``op.sinks``, local-heads): in the kernel's tile loop, which skips the key
    tiles outside a streaming head's sinks and window.
 7. multi-head latent attention (``rewrite.latent``, ``mla.py``): a full forward or a prompt up-projects K/V
    into the flash kernel; ``TritonModule.generate`` decodes the steps over the latent cache in the MLA kernel.
Refused with ``BackendError`` (naming the site and the feature): a tanh soft-cap, other score functions,
per-head biases (ALiBi, relative position) and other arbitrary masks, padding with linear attention, a
top-left causal ``Sq != Sk`` core, no GPU without ``TRITON_INTERPRET=1``. Clipped/linear score functions are confirmed by execution at lowering time:
the kernel must agree with the module on a small random input, or the site is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rewrite.backends import LoweredMixin
from rewrite.errors import BackendError
from rewrite.graph import sites, with_sites
from rewrite.ir import DROP
from rewrite.latent import is_latent

from ._common import is_interpreted
from .flash import _attn_fwd_kernel, attention_forward
from .linear import FEATURE_MAPS, linear_attention_forward
from .mla import LatentTritonSite

__all__ = ["lower_triton", "TritonModule", "TritonSite", "split_mask", "site_kind"]



def _is_linear(fn) -> bool:
    """Linear attention by duck typing: ``kind == "linear"``, or a ``feature_map`` and an ``eps``."""
    return getattr(fn, "kind", None) == "linear" or (hasattr(fn, "feature_map") and hasattr(fn, "eps"))


def site_kind(op) -> tuple:
    """(kind, options) for the kernel that runs ``op``'s core, or BackendError naming the feature."""
    fn, name = op.score_fn, op.info.name
    if op.softcap:
        raise BackendError(f"site {name}: the tanh soft-cap of the scores (c·tanh(s/c), c={op.softcap:g}) is not in "
                           "the Triton kernels; use backend='eager' or 'onnxruntime' for this model")
    if op.sink_logits is not None:
        raise BackendError(f"site {name}: attention sinks (a learned logit per head in every softmax row) are not "
                           "in the Triton kernels; use backend='eager' or 'onnxruntime' for this model")
    if op.window is not None and _is_linear(fn):
        raise BackendError(f"site {name}: streaming heads (window/sinks) with linear attention have no Triton kernel")
    if fn is None:
        return "softmax", {}
    if _is_linear(fn) and getattr(fn, "window", 0):
        raise BackendError(f"site {name}: lit window={fn.window} (sliding-window softmax + linear attention, LoLCATs) "
                           "has no Triton kernel; use backend='eager' or 'onnxruntime' for this model")
    learned = [n for n, _ in fn.named_parameters()]
    if learned:  # e.g. LiT's depthwise convolution over V: not part of any kernel
        raise BackendError(f"site {name}: score function {type(fn).__name__} has parameters "
                           f"({', '.join(learned[:4])}) that the Triton kernels do not compute")
    if _is_linear(fn):
        feature_map = getattr(fn, "feature_map", "relu")
        if feature_map not in FEATURE_MAPS:
            raise BackendError(f"site {name}: linear attention with feature map {feature_map!r} has no Triton "
                               f"kernel (supported: {', '.join(FEATURE_MAPS)})")
        return "linear", {"eps": float(getattr(fn, "eps", 1e-6)), "feature_map": feature_map}
    if hasattr(fn, "zeta") and hasattr(fn, "gamma"):
        return "clipped", {"clip": (float(getattr(fn, "zeta")), float(getattr(fn, "gamma")))}
    raise BackendError(f"site {name}: score function {type(fn).__name__} has no Triton kernel (supported: "
                       "softmax, clipped softmax with zeta/gamma, linear attention with kind='linear')")


def split_mask(mask: Optional[torch.Tensor], batch: int, q_len: int, k_len: int, causal: bool, site: str):
    """(key_padding [B, Sk] bool or None, causal) equal to the SDPA ``mask``, else BackendError."""
    if mask is None:
        if causal and q_len != k_len:
            raise BackendError(f"site {site}: causal attention with Sq={q_len} != Sk={k_len} aligns top-left in "
                               "SDPA, bottom-right in the Triton kernel")
        return None, causal
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool(((mask == 0) | (mask <= DROP)).all()):
            raise BackendError(f"site {site}: additive mask holds values other than 0 and -inf (a bias such as "
                               "ALiBi); the Triton kernel takes key padding and causal masks only")
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    if keep.shape[1] != 1:
        raise BackendError(f"site {site}: per-head mask of shape {tuple(mask.shape)}; the Triton kernel takes "
                           "key padding and causal masks only")
    keep = keep[:, 0].expand(batch, q_len, k_len)  # (B, Sq, Sk)
    pad = keep[:, -1, :]  # the last query row sees every kept key, with or without the triangle
    if bool((keep == pad[:, None, :]).all()):
        return (None if bool(pad.all()) else pad.contiguous()), False
    rows = torch.arange(q_len, device=keep.device)[:, None]
    cols = torch.arange(k_len, device=keep.device)[None, :]
    tri = cols <= rows + (k_len - q_len)  # bottom-right aligned, as in the kernel
    if bool((keep == (tri[None] & pad[:, None, :])).all()):
        return (None if bool(pad.all()) else pad.contiguous()), True
    raise BackendError(f"site {site}: the attention mask is neither key padding nor key padding + causal; "
                       "the Triton kernel cannot run it")


class TritonSite(nn.Module):
    """A canonical op whose core runs in Triton; called like the op: ``(x, kv, mask, *side)``."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.kind, self.options = site_kind(op)

    def core(self, q, k, v, mask, gate):
        if gate is not None and gate.dim() == 4:  # a per-feature output gate [B, Hq, Sq, dv]: after the kernel
            return self.core(q, k, v, mask, None) * gate
        op = self.op
        pad, causal = split_mask(mask, q.shape[0], q.shape[2], k.shape[2], op.causal, op.info.name)
        try:
            if self.kind == "linear":
                causal = bool(getattr(op.score_fn, "causal", causal))  # the module's own flag wins
                if pad is not None:
                    raise BackendError(f"site {op.info.name}: key padding masks with linear attention have no "
                                       "Triton kernel")
                o = linear_attention_forward(q, k, v, k_map=op.k_map, v_map=op.v_map, causal=causal,
                                             **self.options)
                return o if gate is None else o * gate.unsqueeze(-1)
            return attention_forward(q, k, v, k_map=op.k_map, v_map=op.v_map, scale=op.scale, causal=causal,
                                     key_padding_mask=pad, head_scale=gate, window=op.window, sinks=op.sinks,
                                     **self.options)
        except ValueError as e:
            raise BackendError(f"site {op.info.name}: Triton kernel refused its inputs: {e}") from e

    def forward(self, x, kv=None, mask=None, *side):
        op = self.op
        provider = getattr(op, "weights", None)  # shared weight atoms (MASA), built once per forward
        weights = provider() if provider is not None else None
        extra = {} if weights is None else {"weights": weights}
        q, k, v = op.project_qkv(x, kv, *side, **extra)
        gate = op.head_gate(op, x, q) if op.head_gate is not None else None
        o = self.core(q, k, v, mask, gate)
        return op.merge(o) if weights is None else op.merge(o, weights[3])


def _kernels_runnable(device: torch.device) -> bool:
    return is_interpreted(_attn_fwd_kernel) or (device.type == "cuda" and torch.cuda.is_available())


def _confirm(site: TritonSite) -> None:
    """Run the kernel and the site's own score function on a small random input; refuse if they differ."""
    op = site.op
    if site.kind in ("softmax", "latent"):
        return
    device, dtype = op.wq.device, op.wq.dtype
    g = torch.Generator().manual_seed(0)
    b, s = 2, 7
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for h, d in
               ((op.q_heads, op.head_dim), (op.k_heads, op.head_dim), (op.v_heads, op.v_head_dim)))
    with torch.no_grad():
        want = op.score_fn(op, q, k, v, None)
        got = site.core(q, k, v, None, None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = (want.float() - got.float()).abs().max().item()
    if not err <= tol * max(1.0, want.float().abs().max().item()):
        raise BackendError(f"site {op.info.name}: the Triton {site.kind} kernel differs from the site's "
                           f"{type(op.score_fn).__name__} by {err:.3g} on a random input; it cannot be lowered")


class TritonModule(LoweredMixin, nn.Module):
    """The converted model with every attention core in Triton; same calls, outputs and API as ``conv``."""

    def __init__(self, conv, gm):
        super().__init__()
        self.converted = conv
        self.gm = gm


    def forward(self, *args, **kwargs):
        return self.gm(**self.converted.bind(args, kwargs), **self.converted.fixed)

    def hf_model(self):
        """``conv.to_transformers()`` with each site's attention in Triton, its cache included (built once):
        multi-head latent attention sites only (``mla.py``: the kernel reads the latent cache); the other kernels
        have no cached path and are refused by name."""
        hf = self.__dict__.get("_hf")
        if hf is None:
            from rewrite.hf_adapter import SiteAdapter

            other = [op.info.name for op in self.converted.sites if not is_latent(op)]
            if other:
                raise BackendError(f"site {other[0]}: generate on the triton backend runs multi-head latent attention "
                                   "sites only (the other kernels have no cached decode path); use conv.generate")
            hf = self.converted.to_transformers()
            lowered = {id(site.op): site for site in sites(self.gm)}
            for module in hf.modules():
                if isinstance(module, SiteAdapter):
                    module.op = lowered[id(module.op)]
            self.__dict__["_hf"] = hf
        return hf

    def generate(self, input_ids, attention_mask=None, **generate_kwargs):
        """As ``conv.generate``, on ``hf_model()`` (latent sites decode in the Triton MLA kernel)."""
        hf = self.hf_model()
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask
        with torch.no_grad():
            return hf.generate(input_ids=input_ids, **generate_kwargs)


def lower_triton(conv) -> TritonModule:
    """``conv`` with every site's core in the Triton kernels; BackendError names a site that cannot be."""
    ops = sites(conv.gm)
    device = ops[0].wo.device if ops else torch.device("cpu")
    if not (is_interpreted(_attn_fwd_kernel) or torch.cuda.is_available()):
        raise BackendError("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 (set before triton is "
                           "first imported) to run the kernels in the CPU interpreter")
    lowered = {i: LatentTritonSite(op) if is_latent(op) else TritonSite(op) for i, op in enumerate(ops)}
    if _kernels_runnable(device):
        for site in lowered.values():
            _confirm(site)
    kinds = [s.kind for s in lowered.values()]
    conv.report.backend = "triton"
    conv.report.extras["triton"] = {"interpreted": is_interpreted(_attn_fwd_kernel),
                                    "sites": dict(zip([op.info.name for op in ops], kinds))}
    return TritonModule(conv, with_sites(conv.gm, lowered))
