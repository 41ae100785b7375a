"""LiT: linear attention with inherited weights (Wang et al., arXiv 2501.12976; METHODS.md card 7).

    softmax(Q Kᵀ/√d) V  →  O_t = φ(q_t) (Σ_j φ(k_j)ᵀ v_j) / (φ(q_t) · Σ_j φ(k_j) + ε),   φ = ReLU

``feature_map=hedgehog`` (Zhang et al., Hedgehog; LoLCATs): a learned map per head, the query head's for
queries and the key head's for keys, φ(x) = [softmax(x W_h + b_h), softmax(−x W_h − b_h)] (2d features,
W = I at the start); train it with ``rewrite.distill(..., transfer_steps=N)`` (per-site attention transfer)
before end-to-end steps. ``relu`` and ``elu`` (elu + 1) are fixed.

``window=W`` (LoLCATs' hybrid, ``rewrite.window_linear``; causal sites only): the last W keys of each query keep
softmax scores γ_h·exp(q·k·scale − m), older keys the feature scores φ(q)·φ(k), under one normalisation; γ_h =
sigmoid(g_h) is learned per query head (g = 0 at the start). Decoding keeps the last W keys/values and the linear
state of the older tokens (``rewrite.cache.WindowStateLayer``). W = 0: pure linear attention.

per query head, in fp32. Causal sites sum over j ≤ t in chunks of 64 (a masked block inside the chunk
plus prefix sums of the chunk states; bottom-right aligned prefix sums when Sq < Sk); key positions a
padding mask drops contribute nothing. On a 2-D token grid an optional
depthwise convolution over V (zero-initialised, so it starts as a no-op) is added to the output:
O += DWConv(V on the H×W patch grid), class/register tokens excluded.

Cases handled:
  1. bidirectional self-attention, with or without a key-padding mask (bool or additive);
  2. causal self-attention (``op.causal`` or a causal mask, with padding);
  3. ``conv=auto``: the convolution is on when the site's token count is static (images, not
     text) and, less 0-8 class tokens, a perfect square; kernel 5 (3 on grids under 5×5);
  4. ``inherit=false``: q, k, v, o re-initialised (seeded) instead of inherited.
Refused:
  1. cross-attention sites (Diagnostic "lit does not support cross-attention at <site>");
  2. masks that are neither causal nor padding (Diagnostic);
  3. ``conv=on`` where there is no grid or the site is causal (Diagnostic);
  4. ``window > 0`` at a bidirectional site (Diagnostic "lit window=W needs a causal site; <site> is
     bidirectional");
  5. an unknown ``feature_map`` or ``conv`` value, ``eps <= 0``, ``window < 0`` (SpecError).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rewrite.calibrate import record_site_inputs
from rewrite.errors import SpecError
from rewrite.graph import SITES, sites
from rewrite.heads import rebuild
from rewrite.pass_base import Diagnostic, SitePass, register, rewrite_each_site

__all__ = ["Lit", "LinearAttention", "classify_mask"]

FEATURE_MAPS = {"relu": F.relu, "elu": lambda x: F.elu(x) + 1.0, "hedgehog": None}  # hedgehog: learned, per head
MASKED = -1e3  # additive mask entries below this drop the key
CHUNK = 64  # causal chunk length: C×C scores per chunk plus one d×dv state per chunk


def key_keep(mask: torch.Tensor) -> torch.Tensor:
    """The keys the last query row may read, as 0/1 floats broadcastable to ``[B, H, Sk, 1]``."""
    last = mask[..., -1, :] if mask.dim() >= 2 else mask
    keep = last if last.dtype == torch.bool else last > MASKED
    return keep.float().unsqueeze(-1)


class LinearAttention(nn.Module):
    """score_fn: φ(Q)(φ(K)ᵀV) / (φ(Q)·Σφ(K) + ε), optionally plus a depthwise conv of V on a patch grid."""

    def __init__(self, feature_map: str = "relu", eps: float = 1e-6, causal: bool = False,
                 grid: int = 0, class_tokens: int = 0, channels: int = 0, kernel: int = 3,
                 q_heads: int = 0, k_heads: int = 0, head_dim: int = 0, window: int = 0):
        super().__init__()
        self.feature_map, self.eps, self.causal = feature_map, float(eps), bool(causal)
        self.grid, self.class_tokens = grid, class_tokens
        self.window, self.q_heads = int(window), int(q_heads)
        self.window_gate = nn.Parameter(torch.zeros(q_heads)) if self.window else None  # γ_h = sigmoid(g_h)
        self.maps = None
        if feature_map == "hedgehog":  # W [H, d, d] = I, b = 0 per query head ("q") and key head ("k")
            eye = torch.eye(head_dim)
            self.maps = nn.ParameterDict({
                "wq": nn.Parameter(eye.repeat(q_heads, 1, 1)), "bq": nn.Parameter(torch.zeros(q_heads, 1, head_dim)),
                "wk": nn.Parameter(eye.repeat(k_heads, 1, 1)), "bk": nn.Parameter(torch.zeros(k_heads, 1, head_dim))})
        self.conv: Optional[nn.Conv2d] = None
        if grid:
            self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    @property
    def feature_dim(self) -> int:
        """Features per head (the state is feature_dim × dv per head pair); 0: the head size."""
        return 2 * self.maps["wq"].shape[-1] if self.maps is not None else 0

    def phi(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """φ of queries (``side="q"``, ``[B, Hq, S, d]``) or keys (``"k"``, ``[B, Hk, S, d]``), in fp32."""
        if self.maps is None:
            return FEATURE_MAPS[self.feature_map](x.float())
        y = x.float() @ self.maps["w" + side] + self.maps["b" + side]  # (B, H, S, d)
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)

    def gamma(self) -> torch.Tensor:
        """The window's factor γ_h = sigmoid(g_h) per query head."""
        return torch.sigmoid(self.window_gate.float())

    def forward(self, op, q, k, v, mask):
        fq = self.phi(q, "q")  # (B, Hq, Sq, f)
        fk = op._expand(self.phi(k, "k"), op.k_map, op._k_group)  # (B, Hq, Sk, f)
        vf = op._expand(v, op.v_map, op._v_group).float()  # (B, Hq, Sk, dv)
        if self.window:
            from rewrite.window_linear import hybrid_sums

            kq = op._expand(k, op.k_map, op._k_group).float()
            num, den = hybrid_sums(q.float(), kq, vf, fq, fk, None if mask is None else key_keep(mask), op.scale,
                                   self.window, self.gamma())
            return (num / den.clamp_min(self.eps)).to(q.dtype)
        if mask is not None:
            fk = fk * key_keep(mask)
        if self.causal and q.shape[2] == k.shape[2]:
            num, den = _causal_chunked(fq, fk, vf)
        elif self.causal:  # fewer queries than keys (decoding): bottom-right aligned prefix sums
            sq, sk = q.shape[2], k.shape[2]
            kv = torch.cumsum(fk.unsqueeze(-1) * vf.unsqueeze(-2), dim=2)[:, :, sk - sq:]  # (B, H, Sq, d, dv)
            z = torch.cumsum(fk, dim=2)[:, :, sk - sq:]  # (B, H, Sq, d)
            num = torch.einsum("bhsd,bhsde->bhse", fq, kv)
            den = (fq * z).sum(-1, keepdim=True)
        else:
            kv = torch.einsum("bhsd,bhse->bhde", fk, vf)  # (B, H, d, dv)
            num = torch.einsum("bhsd,bhde->bhse", fq, kv)
            den = torch.einsum("bhsd,bhd->bhs", fq, fk.sum(2)).unsqueeze(-1)
        o = num / (den + self.eps)
        if self.conv is not None:
            o = o + self._grid_conv(vf)
        return o.to(q.dtype)

    def to_spec(self) -> dict:
        conv = self.conv
        maps = self.maps
        return {"feature_map": self.feature_map, "eps": self.eps, "causal": self.causal, "grid": self.grid,
                "class_tokens": self.class_tokens, "channels": conv.in_channels if conv is not None else 0,
                "kernel": conv.kernel_size[0] if conv is not None else 3,
                "q_heads": self.q_heads,
                "k_heads": maps["wk"].shape[0] if maps is not None else 0,
                "head_dim": maps["wq"].shape[-1] if maps is not None else 0, "window": self.window}

    @classmethod
    def from_spec(cls, spec: dict, **_) -> "LinearAttention":
        return cls(**spec)

    @property
    def recurrent(self) -> bool:
        """Decoding keeps the fixed-size state (S, z) instead of keys and values (causal sites, no window)."""
        return self.causal and self.conv is None and not self.window

    @property
    def windowed(self) -> bool:
        """Decoding keeps the last ``window`` keys/values plus the state (S, z) of the older tokens."""
        return self.causal and self.window > 0

    def step(self, op, q, k, v, mask, cache):
        """The new tokens' outputs from the state of the earlier ones, then the state moves on:

            O_t = φ(q_t)(S + Σ_{new j≤t} φ(k_j)ᵀv_j) / (φ(q_t)·(z + Σ_{new j≤t} φ(k_j)) + ε)
            S ← S + Σ_new φ(k_j)ᵀ v_j,   z ← z + Σ_new φ(k_j)

        S and z are kept per distinct (key head, value head) pair, P of them (Hk for GQA, Hq for MHA).
        With a window: ``rewrite.window_linear.hybrid_step``.
        """
        if self.window:
            from rewrite.window_linear import hybrid_step

            return hybrid_step(self, op, q, k, v, mask, cache)
        layer = cache.state_layer()
        sq, past = q.shape[2], layer.tokens
        pair_of_q, k_of_pair, v_of_pair = _pairs(op)
        fk = self.phi(k, "k")  # (B, Hk, Sq, f)
        if mask is not None:  # the new keys are columns past .. past+Sq of the mask
            fk = fk * key_keep(mask[..., past:past + sq])
        fk, vf = fk.index_select(1, k_of_pair), v.float().index_select(1, v_of_pair)  # (B, P, Sq, d|dv)
        fq = self.phi(q, "q")  # (B, Hq, Sq, f)
        num, den = _causal_chunked(fq, fk.index_select(1, pair_of_q), vf.index_select(1, pair_of_q))
        s0, z0 = layer.state()
        s_new = torch.einsum("bpsd,bpse->bpde", fk, vf)  # (B, P, d, dv)
        z_new = fk.sum(2)  # (B, P, d)
        if s0 is not None:
            num = num + torch.einsum("bhsd,bhde->bhse", fq, s0.index_select(1, pair_of_q))
            den = den + torch.einsum("bhsd,bhd->bhs", fq, z0.index_select(1, pair_of_q)).unsqueeze(-1)
            s_new, z_new = s0 + s_new, z0 + z_new
        layer.absorb(s_new, z_new, sq)
        return (num / (den + self.eps)).to(q.dtype)

    def _grid_conv(self, v: torch.Tensor) -> torch.Tensor:
        b, h, s, dv = v.shape
        patches = v[:, :, self.class_tokens:].transpose(2, 3)  # (B, H, dv, P)
        y = self.conv(patches.reshape(b, h * dv, self.grid, self.grid))  # (B, H*dv, g, g)
        y = y.reshape(b, h, dv, -1).transpose(2, 3)  # (B, H, P, dv)
        return F.pad(y, (0, 0, self.class_tokens, 0))  # class tokens get no conv term

    def extra_repr(self) -> str:
        conv = f", conv={self.grid}x{self.grid}+{self.class_tokens} cls" if self.conv is not None else ""
        window = f", window={self.window}" if self.window else ""
        return f"phi={self.feature_map}, eps={self.eps:g}, causal={self.causal}{conv}{window}"

    def select(self, keep: torch.Tensor):
        """The score function for the query heads ``keep`` (original numbering) of the same KV heads: None for a
        learned map (its key maps belong to KV heads the selection may drop) or a window (γ per query head)."""
        return None if self.maps is not None or self.window else self


def _pairs(op):
    """(pair index of each query head [Hq], key head of each pair [P], value head of each pair [P])."""
    pairs = sorted(set(zip(op.k_map.tolist(), op.v_map.tolist())))
    where = {p: i for i, p in enumerate(pairs)}
    device = op.k_map.device
    pair_of_q = torch.tensor([where[p] for p in zip(op.k_map.tolist(), op.v_map.tolist())], device=device)
    return (pair_of_q, torch.tensor([p[0] for p in pairs], device=device),
            torch.tensor([p[1] for p in pairs], device=device))


def _causal_chunked(fq, fk, v, chunk: int = CHUNK):
    """Causal sums Σ_{j≤t} in chunks: a masked (φq φkᵀ) block inside each chunk plus the prefix state
    Σ φkᵀv of all earlier chunks. Returns (numerator [B, H, S, dv], denominator [B, H, S, 1])."""
    b, h, s, d = fq.shape
    dv = v.shape[-1]
    pad = (chunk - s % chunk) % chunk
    fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    q = fq.reshape(b, h, -1, chunk, d)  # (B, H, n, C, d)
    k = fk.reshape(b, h, -1, chunk, d)
    vc = v.reshape(b, h, -1, chunk, dv)  # (B, H, n, C, dv)
    state = torch.einsum("bhncd,bhnce->bhnde", k, vc)  # per-chunk Σ φkᵀv  (B, H, n, d, dv)
    state = torch.cumsum(state, dim=2) - state  # exclusive prefix: earlier chunks only
    zsum = k.sum(3)  # (B, H, n, d)
    zsum = torch.cumsum(zsum, dim=2) - zsum
    a = torch.einsum("bhncd,bhnmd->bhncm", q, k).tril()  # within the chunk, j ≤ t  (B, H, n, C, C)
    num = torch.einsum("bhncm,bhnme->bhnce", a, vc) + torch.einsum("bhncd,bhnde->bhnce", q, state)
    den = a.sum(-1) + torch.einsum("bhncd,bhnd->bhnc", q, zsum)
    return num.reshape(b, h, -1, dv)[:, :, :s], den.reshape(b, h, -1, 1)[:, :, :s]


def classify_mask(mask: Optional[torch.Tensor]) -> Optional[str]:
    """'none' | 'padding' (every query row reads the same keys) | 'causal' (padding ∧ j ≤ t) | None (other).

    Rows of padded query positions may differ (their outputs are not used).
    """
    if mask is None:
        return "none"
    keep = mask if mask.dtype == torch.bool else mask > MASKED
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask <= MASKED)).all()):
        return None  # an additive bias (ALiBi, relative positions), not a mask
    if keep.dim() < 2:
        return "padding"
    sq, sk = keep.shape[-2:]
    last = keep[..., -1:, :]
    rows = torch.ones(sq, dtype=torch.bool) if sq != sk else last[..., 0, :].unsqueeze(-1)  # used query rows
    tril = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    if bool(((keep == last) | ~rows).all()):
        return "padding"
    if bool(((keep == (last & tril)) | ~rows).all()):
        return "causal"
    return None


def _grid(tokens: int, max_class_tokens: int = 8) -> Optional[tuple]:
    """(class tokens, side) if ``tokens`` less 0..8 leading tokens is a square of side >= 2."""
    for cls in range(max_class_tokens + 1):
        side = math.isqrt(max(tokens - cls, 0))
        if side >= 2 and side * side == tokens - cls:
            return cls, side
    return None


@register
@dataclasses.dataclass(frozen=True)
class Lit(SitePass):
    name = "lit"
    feature_map: str = "relu"
    conv: str = "auto"  # "auto" | "on" | "off"
    inherit: bool = True
    eps: float = 1e-6
    seed: int = 0  # for inherit=false
    window: int = 0  # softmax over the last `window` keys, linear attention before them (LoLCATs); 0: none

    def check_options(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise SpecError(f"lit{{feature_map={self.feature_map}}}: unknown feature map; valid: "
                            f"{', '.join(FEATURE_MAPS)}")
        if self.conv not in ("auto", "on", "off"):
            raise SpecError(f"lit{{conv={self.conv}}}: conv must be auto, on or off")
        if not self.eps > 0:
            raise SpecError(f"lit{{eps={self.eps}}}: eps must be positive")
        if not (isinstance(self.window, int) and self.window >= 0):
            raise SpecError(f"lit{{window={self.window}}}: window must be an integer >= 0 (0: pure linear attention)")

    def run(self, gm, ctx):
        self.check_options()
        masks = _example_masks(gm, ctx)
        tokens = _static_token_counts(gm)
        return rewrite_each_site(gm, lambda i, op: self._rewrite(i, op, masks[i], tokens.get(i)))

    def _rewrite(self, i, op, masks, static_tokens):
        site = op.info.name
        if op.info.cross:
            return None, {}, [Diagnostic("skip", f"lit does not support cross-attention at {site}", site)]
        kinds = {classify_mask(m) for m in masks}
        if None in kinds:
            return None, {}, [Diagnostic("skip", f"lit needs a causal or padding mask at {site}; this site's "
                                         "mask is neither (a bias or arbitrary pattern)", site)]
        causal = op.causal or "causal" in kinds
        if self.window and not causal:
            return None, {}, [Diagnostic("skip", f"lit window={self.window} needs a causal site; {site} is "
                                         "bidirectional", site)]
        grid = _grid(static_tokens) if static_tokens else None
        if self.conv == "on" and (grid is None or causal):
            why = "it is causal" if causal else "its token count is dynamic or not class tokens + a square grid"
            return None, {}, [Diagnostic("skip", f"lit conv=on needs a 2-D token grid at {site}, but {why}", site)]
        use_conv = grid is not None and not causal and self.conv != "off"
        new = rebuild(op) if self.inherit else _reinitialised(op, self.seed + i)
        cls, side = grid if use_conv else (0, 0)
        new.score_fn = LinearAttention(self.feature_map, self.eps, causal, side, cls, new.q_heads * new.v_head_dim,
                                       kernel=5 if side >= 5 else 3, q_heads=new.q_heads, k_heads=new.k_heads,
                                       head_dim=new.head_dim, window=self.window)
        st = {"causal": causal, "inherited": self.inherit, "window": self.window,
              "conv": f"{new.score_fn.conv.kernel_size[0]}x{new.score_fn.conv.kernel_size[0]} on {side}x{side} "
                      f"grid, {cls} class tokens" if use_conv else "off"}
        notes = [Diagnostic("warning", f"the scores' soft-cap {op.softcap:g}·tanh(s/{op.softcap:g}) has no counterpart "
                            "in linear attention; it is dropped at this site", site)] if op.softcap else []
        if new.sink_logits is not None:
            new.sink_logits = None
            notes.append(Diagnostic("warning", "the attention sinks (a logit per head in every softmax row) have no "
                                    "counterpart in linear attention; they are dropped at this site", site))
        return new, st, notes


def _reinitialised(op, seed: int):
    """q, k, v, o drawn afresh (uniform ±1/√fan_in, seeded), biases zeroed."""
    g = torch.Generator().manual_seed(seed)

    def fresh(w, fan_in):
        return (torch.rand(w.shape, generator=g, dtype=torch.float32) * 2 - 1).to(w.dtype) / math.sqrt(fan_in)

    zero = (lambda b: None if b is None else torch.zeros_like(b))
    return rebuild(op, wq=fresh(op.wq, op.wq.shape[-1]), wk=fresh(op.wk, op.wk.shape[-1]),
                   wv=fresh(op.wv, op.wv.shape[-1]), wo=fresh(op.wo, op.wo.shape[1] * op.wo.shape[2]),
                   bq=zero(op.bq), bk=zero(op.bk), bv=zero(op.bv), bo=zero(op.bo))


def _example_masks(gm, ctx) -> list:
    """Per site, the masks it received on the example input and up to two calibration batches."""
    n = len(sites(gm))
    if ctx.captured is None:
        return [[] for _ in range(n)]
    batches = [ctx.captured.kwargs] + list(ctx.calibration or [])[:2]
    records = record_site_inputs(gm, ctx.call(gm), batches)
    return [[r.args[2] for r in per_site if len(r.args) > 2] for per_site in records]


def _static_token_counts(gm) -> dict:
    """Site index -> its query token count when the traced graph holds it as a constant (images)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(SITES + "."):
            continue
        i = int(str(node.target).split(".")[1])
        op = sites(gm)[i]
        val = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
        if val is None:
            continue
        size = val.shape[0 if op.info.layout == "SBD" else 1]
        if isinstance(size, int):
            out[i] = size
    return out
