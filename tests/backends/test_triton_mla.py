"""Triton MLA kernel over the latent cache (issue 14) against ``LatentAttention.absorbed``, and the Triton backend's
latent sites: a full forward through the flash kernel, generate through the MLA kernel (TRITON_INTERPRET=1)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` (conftest sets it too)

import pytest
import torch

import models as M
import rewrite
from rewrite import families as fam
from rewrite.backends import lower
from rewrite.backends.triton.mla import _mla_kernel, mla_attention, mla_reference
from rewrite.errors import BackendError

DEVICE = M.triton_device(_mla_kernel)
TOL = 1e-4


@pytest.fixture(scope="module")
def deepseek():
    torch.manual_seed(0)
    model = fam.model_class("deepseek_v3")(fam.tiny_config("deepseek_v3")).eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in fam.make_inputs(model, 2, 8).items()}
    return rewrite.convert(model, passes=[], example_inputs=inputs, progress=False)


@pytest.fixture(scope="module")
def mla_llama():  # R = 2 RoPE key heads, each read by two query heads
    def inputs(batch, seq, seed=0):
        return {"input_ids": M.ids(batch, seq, seed).to(DEVICE), "attention_mask": torch.ones(batch, seq, dtype=torch.long,
                                                                                         device=DEVICE)}

    torch.manual_seed(0)
    return rewrite.convert(M.llama(kv_heads=2).to(DEVICE), "mla{kv_rank=24,rope_dims=8}", progress=False,
                           example_inputs=inputs(2, 8), calibration=[inputs(1, 16, s) for s in (1, 2)])


def _random_latent(op, batch, sq, t, seed):
    g = torch.Generator().manual_seed(seed)
    h, r, rr, dr, dn = op.q_heads, op.kv_rank, op.rope_heads, op.rope_dim, op.nope_dim
    shapes = ((batch, h, sq, dn), (batch, h, sq, dr), (batch, 1, t, r), (batch, rr, t, dr))
    return [torch.randn(s, generator=g).to(DEVICE) for s in shapes]


@pytest.mark.parametrize("which", ["deepseek", "mla_llama"])
@pytest.mark.parametrize("sq,causal,pad", [(1, False, False), (1, False, True), (5, True, True), (4, True, False)])
def test_kernel_equals_the_absorbed_form(request, which, sq, causal, pad):
    op = request.getfixturevalue(which).sites[0]
    batch, t = 3, 21
    q_nope, q_rope, c, kr = _random_latent(op, batch, sq, t, seed=sq + 7 * pad)
    keep = torch.ones(batch, t, dtype=torch.bool, device=DEVICE)
    if pad:
        keep[0, :6] = False  # left padding
        keep[2, :17] = False  # fewer kept tokens than one tile (the interpreter's tiles are 16 tokens)
    mask = keep[:, None, None, :] & torch.ones(sq, t, dtype=torch.bool, device=DEVICE).tril(t - sq) if causal \
        else keep[:, None, None, :]
    with torch.no_grad():
        want = op.absorbed(q_nope, q_rope, c, kr, mask, False)
        # padded cases in two token splits (flash-decoding; the second row's first split keeps no token)
        o_lat = mla_attention((q_nope @ op.w_uk).contiguous(), q_rope, c, kr, rope_map=op.rope_map, scale=op.scale,
                              causal=causal, key_padding_mask=keep if pad else None, splits=2 if pad else 1)
        got = o_lat @ op.w_uv.transpose(-1, -2) + (0 if op.b_uv is None else op.b_uv[None, :, None, :])
        ref = mla_reference((q_nope @ op.w_uk), q_rope, c, kr, rope_map=op.rope_map, scale=op.scale, causal=causal,
                            key_padding_mask=keep if pad else None)
    assert (o_lat - ref).abs().max().item() <= TOL
    rows = mask.any(-1)[:, :, :, None].expand_as(want)  # rows with a kept token (the others are 0 here)
    assert (got - want)[rows].abs().max().item() <= TOL * max(1.0, want.abs().max().item())


def test_kernel_refuses_bad_inputs(deepseek):
    op = deepseek.sites[0]
    q_nope, q_rope, c, kr = _random_latent(op, 2, 1, 5, seed=0)
    q_lat = (q_nope @ op.w_uk).contiguous()
    with pytest.raises(ValueError, match=r"expected \[B, H, Sq, r\], \[B, H, Sq, dr\], \[B, 1, T, r\], \[B, R, T, dr\]"):
        mla_attention(q_lat, q_rope, c[..., :-1], kr, rope_map=op.rope_map, scale=op.scale)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor \[B, T\] = \(2, 5\)"):
        mla_attention(q_lat, q_rope, c, kr, rope_map=op.rope_map, scale=op.scale, key_padding_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"heads must be the \[R, G\] = \(1, 4\) table of head_table"):
        mla_attention(q_lat, q_rope, c, kr, rope_map=op.rope_map, scale=op.scale,
                      heads=torch.zeros(2, 2, dtype=torch.int32, device=DEVICE))
    uneven = torch.tensor([0, 0, 0, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"RoPE key heads read by unequal numbers of query heads \(\[3, 1\]\)"):
        mla_attention(q_lat, q_rope, c, kr.expand(-1, 2, -1, -1).contiguous(), rope_map=uneven, scale=op.scale)


@pytest.mark.parametrize("which", ["deepseek", "mla_llama"])
def test_triton_backend_forward_and_generate(request, which):
    conv = request.getfixturevalue(which)
    tri = lower(conv, "triton")
    assert set(tri.report.extras["triton"]["sites"].values()) == {"latent"}
    vocab = conv.hf_model().config.vocab_size
    ids = torch.randint(1, vocab, (3, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():  # a full forward at another batch and length: up-projected K/V in the flash kernel
        want, got = conv(input_ids=ids, attention_mask=mask)[0], tri(input_ids=ids, attention_mask=mask)[0]
    assert (got - want)[mask.bool()].abs().max().item() <= TOL
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = conv.generate(ids, attention_mask=mask, **greedy)
    assert torch.equal(tri.generate(ids, attention_mask=mask, **greedy), out)
    # a padded prompt, then one cached step: the logits of both, and a cache of latents and RoPE keys only
    longer = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    logits = []
    with torch.no_grad():
        for hf in (conv.hf_model(), tri.hf_model()):
            past = hf(ids, attention_mask=mask, use_cache=True).past_key_values
            logits.append(hf(out[:, 11:12], attention_mask=longer, past_key_values=past, use_cache=True).logits[:, -1])
    assert (logits[1] - logits[0]).abs().max().item() <= TOL
    for layer, op in zip(past.layers, conv.sites):
        assert tuple(layer.keys.shape) == (3, 1, 12, op.kv_rank)
        assert tuple(layer.values.shape) == (3, op.rope_heads, 12, op.rope_dim)


def test_generate_refuses_sites_without_a_cached_kernel():
    conv = rewrite.convert(M.llama(kv_heads=2, layers=1).to(DEVICE), passes=[], example_inputs=(M.ids(2, 8).to(DEVICE),),
                           progress=False)
    with pytest.raises(BackendError, match=r"site model\.layers\.0\.self_attn: generate on the triton backend runs "
                                           r"multi-head latent attention sites only"):
        lower(conv, "triton").generate(M.ids(1, 5).to(DEVICE), max_new_tokens=2)
