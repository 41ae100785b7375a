"""Every RoPE layout, whole-projection q/k norms, ``x @ W.T`` projections, and the models' own output gates
(issue 11): each captured family round-trips exactly at another batch and length than traced, with
and without padding, and the passes that change heads stay exact, or refuse with the reason."""
from __future__ import annotations

import functools

import pytest
import torch

import rewrite
from rewrite import families as fam
from rewrite.align import Pairing, apply_head_maps, key_pairing, value_pairing
from rewrite.errors import SpecError
from rewrite.heads import FixedHeads, rebuild, select_query_heads
from rewrite.passes.gated_attention import GatedAttention
from rewrite.passes.gqa import merge_site
from rewrite.recognize.rope import is_linear, rope_layout


@functools.lru_cache(maxsize=None)
def converted(family: str):
    model, _ = fam.tiny_model(family)
    # verify=False: ``exact`` below compares with the model itself, at another batch and length
    conv = rewrite.convert(model, passes=[], example_inputs=fam.make_inputs(model, 2, 8), progress=False,
                           verify=False)
    return model, conv


def exact(model, conv) -> None:
    for pad in (False, True):
        err = fam.rel_err(model, conv, fam.make_inputs(model, 3, 13, pad=pad, seed=1))
        assert err <= fam.EXACT_TOL, f"pad={pad}: {err:.2e}"


# ---- RoPE layouts -------------------------------------------------------------------------------------------
LAYOUTS = {  # family: (layout, rotary dims of 16) as the model writes it
    "gptj": ("interleaved", 8),  # rotate_every_two, partial rotary with a pass-through part
    "cohere": ("interleaved", 16),  # stack(-x2, x1).flatten(-2)
    "glm": ("interleaved", 8),  # stack/flatten, partial
    "llama4_text": ("interleaved", 16),  # view_as_complex, then an L2 q/k norm
    "phi3": ("rotate_half", 16),  # partial_rotary_factor 1.0: an empty pass-through slice
}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_rope_layout_round_trips_and_is_named(family):
    model, conv = converted(family)
    assert len(conv.sites) == fam.count_attention(model, fam.make_inputs(model, 2, 8))
    assert conv.report.refusals == []
    for op in conv.sites:
        assert (op.info.rope, op.info.rotary_dims) == LAYOUTS[family]
    exact(model, conv)


def _rope(x, cos, sin, layout):
    if layout == "rotate_half":
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return x * cos + torch.stack([-x2, x1], -1).flatten(-2) * sin


def test_rope_layout_is_read_by_execution():
    b, s, d, r = 2, 5, 8, 4
    ang = torch.arange(s)[:, None] * torch.tensor([0.3, 0.7])[None, :]  # (S, r/2)
    half = {"rotate_half": torch.cat([ang, ang], -1), "interleaved": ang.repeat_interleave(2, -1)}

    def partial(layout):
        cos, sin = half[layout].cos(), half[layout].sin()
        return lambda x: torch.cat([_rope(x[..., :r], cos, sin, layout), x[..., r:]], -1)

    assert rope_layout(partial("rotate_half"), [], b, s, d) == ("rotate_half", r)
    assert rope_layout(partial("interleaved"), [], b, s, d) == ("interleaved", r)
    assert rope_layout(lambda x: x * 2.0, [], b, s, d) == (None, 0)  # nothing rotates
    flip = lambda x: torch.cat([x[..., 1:2], x[..., 0:1], x[..., 2:]], -1)  # mixes, but is no rotation
    assert rope_layout(flip, [], b, s, d) == ("other", 2)
    # bf16: the tables and the probe round to 8 bits; the layout still reads, a norm still does not pass for linear
    cos, sin = (f(half["rotate_half"]).bfloat16() for f in (torch.cos, torch.sin))
    rot16 = lambda x: torch.cat([_rope(x[..., :r], cos, sin, "rotate_half"), x[..., r:]], -1)
    assert rope_layout(rot16, [], b, s, d, torch.bfloat16) == ("rotate_half", r)
    assert is_linear(rot16, [], b, s, d, torch.bfloat16)
    rms = lambda x: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
    assert not is_linear(lambda x: rot16(rms(x)), [], b, s, d, torch.bfloat16)


def _rotations(p: Pairing, heads: int, seed: int = 0) -> torch.Tensor:
    """Random maps [H, d, d] that a pairing allows: a 2×2 rotation per pair, orthogonal on the free dims."""
    g = torch.Generator().manual_seed(seed)
    t = torch.eye(p.dim, dtype=torch.float64).repeat(heads, 1, 1)
    for h in range(heads):
        th = torch.rand(len(p.pairs), generator=g, dtype=torch.float64) * 6.28
        i, j = p.pairs[:, 0], p.pairs[:, 1]
        t[h, i, i], t[h, j, j], t[h, i, j], t[h, j, i] = th.cos(), th.cos(), -th.sin(), th.sin()
        f = p.free
        if f.numel():
            qm, _ = torch.linalg.qr(torch.randn(f.numel(), f.numel(), generator=g, dtype=torch.float64))
            t[h, f[:, None], f[None, :]] = qm
    return t


def _recorded_call(model, conv, op):
    """(args, output) of ``op``'s call inside ``conv`` at batch 3, length 13."""
    calls = []
    hook = op.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    with torch.no_grad():
        conv(**fam.make_inputs(model, 3, 13, seed=2))
    hook.remove()
    return calls[0]


@pytest.mark.parametrize("family", ["gptj", "cohere"])
def test_align_rotations_commute_with_interleaved_rope(family):
    """align's key pairing for an interleaved site is (2j, 2j+1) on the rotary dims: rotating K heads by maps
    it allows (queries by the inverse transpose) is exact; rotate_half's pairs on the same site are not."""
    model, conv = converted(family)
    op = conv.sites[0]
    p = key_pairing(op)
    r = op.info.rotary_dims
    assert p.pairs.tolist() == [[2 * j, 2 * j + 1] for j in range(r // 2)]
    assert p.free.tolist() == list(range(r, op.head_dim))
    args, ref = _recorded_call(model, conv, op)
    good = apply_head_maps(op, _rotations(p, op.k_heads))
    half = torch.arange(r // 2)
    wrong = Pairing(op.head_dim, torch.stack([half, half + r // 2], 1), p.free)
    bad = apply_head_maps(op, _rotations(wrong, op.k_heads))
    with torch.no_grad():
        scale = float(ref.abs().max())
        assert float((good(*args) - ref).abs().max()) <= 1e-5 * scale
        assert float((bad(*args) - ref).abs().max()) > 1e-3 * scale


def test_gqa_on_interleaved_rope():
    model, conv = converted("cohere")  # 4 query heads, 2 KV heads
    ex = fam.make_inputs(model, 2, 8)
    merged = rewrite.convert(model, passes=["gqa{kv_heads=1}"], example_inputs=ex, progress=False)
    assert [op.kv_heads for op in merged.sites] == [1, 1]
    assert merged.report.to_json()["stages"][-1]["exact"] is False
    op = conv.sites[0]
    copies, st, _ = merge_site(op, 4, "mean")  # every query head its own copy of its KV head: exact
    assert copies.kv_heads == 4 and st["duplicated"]
    args, ref = _recorded_call(model, conv, op)
    with torch.no_grad():
        assert float((copies(*args) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


# ---- q/k norm over the whole projection (OLMo-2) ----------------------------------------------------------------
def test_whole_projection_norm_round_trips_and_refuses_head_changes():
    model, conv = converted("olmo2")
    exact(model, conv)
    op = conv.sites[0]
    assert op.info.qk_norm and (op.info.rope, op.info.rotary_dims) == ("rotate_half", 16)
    assert (op.q_transform.heads, op.k_transform.heads) == (4, 2)
    ex = fam.make_inputs(model, 2, 8)
    with pytest.raises(SpecError, match=r"key norm acts on the whole projection of 2 heads before the head split"):
        rewrite.convert(model, passes=["gqa{kv_heads=1}"], example_inputs=ex, progress=False)
    assert merge_site(op, 2, "mean") == (None, {}, [])  # gqa at the head count it has: unchanged, exact
    with pytest.raises(FixedHeads, match=r"query norm acts on the whole projection of 4 heads .* cannot be exact"):
        select_query_heads(op, [0, 2, 3])  # prune-heads skips such a site with this reason


# ---- a norm of the values before the core (Gemma-4) --------------------------------------------------------------
def test_value_norm_round_trips_and_blocks_value_rotations():
    model, conv = converted("gemma4_text")
    exact(model, conv)
    op = conv.sites[0]
    assert op.v_transform is not None and op.info.qk_norm
    assert value_pairing(op).free.numel() == 0 and key_pairing(op).pairs.numel() == 0  # nothing commutes


class ConvQuery(torch.nn.Module):
    """Attention whose queries add a causal depthwise convolution over the sequence (as ZAYA's)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.conv = torch.nn.Conv1d(d, d, 3, padding=2, groups=d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x)
        q = q + self.conv(q.transpose(1, 2))[..., :s].transpose(1, 2)  # each token mixed with the 2 before it
        q, k, v = (t.view(b, s, self.h, -1).transpose(1, 2) for t in (q, self.k(x), self.v(x)))  # (B, H, S, d)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


def test_token_mixing_before_the_core_is_refused_by_name():
    found = rewrite.inspect(ConvQuery(), (torch.randn(2, 8, 32),))
    assert len(found) == 0
    assert "mixes tokens or heads (such as a convolution over the sequence)" in found.refusals[0].reason


# ---- projections written as x @ W.T (Falcon) ---------------------------------------------------------------------
def test_falcon_linear_round_trips():
    model, conv = converted("falcon")
    assert len(conv.sites) == 2 and conv.report.refusals == []
    exact(model, conv)
    src = conv.sites[0].info.sources["wq"]
    assert src[0].endswith("query_key_value.weight") and src[2] is False  # stored [out, in]


# ---- the models' own output gates --------------------------------------------------------------------------------
@pytest.mark.parametrize("family,per_head", [("afmoe", False), ("laguna", True)])
def test_output_gate_round_trips(family, per_head):
    model, conv = converted(family)
    exact(model, conv)
    gate = conv.sites[0].head_gate
    assert type(gate).__name__ == "OutputGate" and gate.per_head is per_head


def test_prune_heads_slices_the_output_gate():
    """Removing query head 1 of a gated site equals the site with that head's W_o columns zeroed."""
    model, conv = converted("afmoe")
    op = conv.sites[0]
    pruned = select_query_heads(op, [0, 2, 3])
    assert pruned.q_heads == 3 and pruned.head_gate.weight.shape[0] == 3
    wo = op.wo.detach().clone()
    wo[:, 1] = 0
    zeroed = rebuild(op, wo=wo)
    args, _ = _recorded_call(model, conv, op)
    with torch.no_grad():
        ref = zeroed(*args)
        assert float((pruned(*args) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    new, _, diags = GatedAttention().rewrite_site(0, op, None)
    assert new is None and "already has a head gate (OutputGate)" in diags[0].message
