"""Triton kernels vs. plain-PyTorch references on tiny shapes.

Run with the Triton CPU interpreter exported, e.g.::

    TRITON_INTERPRET=1 python -m pytest tests/backends/test_triton_kernels.py -q

The variable is also set below, but that only helps when this module is the first to import
triton in the session; if triton was imported earlier without it (and there is no GPU) the
module is skipped with a message saying so.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import sys
from pathlib import Path

import pytest
import torch

try:
    from rewrite.backends.triton import (attention_forward, attention_reference,
                                         linear_attention_forward, linear_attention_reference)
    from rewrite.backends.triton._common import is_interpreted
    from rewrite.backends.triton.flash import _attn_fwd_kernel
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("rewrite"):
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from backends.triton import (attention_forward, attention_reference,
                                 linear_attention_forward, linear_attention_reference)
    from backends.triton._common import is_interpreted
    from backends.triton.flash import _attn_fwd_kernel

if is_interpreted(_attn_fwd_kernel):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU; "
                "export TRITON_INTERPRET=1 for this suite", allow_module_level=True)

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _qkv(B=2, Hq=4, Hk=4, Hv=4, Sq=13, Sk=20, dh=8, dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, dh, generator=g)
    k = torch.randn(B, Hk, Sk, dh, generator=g)
    v = torch.randn(B, Hv, Sk, dv, generator=g)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v)]


def _maps(*maps):
    return [torch.tensor(m, dtype=torch.int64, device=DEVICE) for m in maps]


def _check_attn(q, k, v, k_map, v_map, **kw):
    scale = q.shape[-1] ** -0.5
    out = attention_forward(q, k, v, k_map=k_map, v_map=v_map, scale=scale, **kw)
    ref = attention_reference(q, k, v, k_map=k_map, v_map=v_map, scale=scale, **kw)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert out.dtype == q.dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])
    return out


# ---------------------------------------------------------------- softmax attention


def test_mha():
    q, k, v = _qkv()
    _check_attn(q, k, v, *_maps([0, 1, 2, 3], [0, 1, 2, 3]))


def test_gqa():
    q, k, v = _qkv(Hk=2, Hv=2, dh=12, dv=12)
    _check_attn(q, k, v, *_maps([i // 2 for i in range(4)], [i // 2 for i in range(4)]))


def test_dha_noncontiguous_maps_and_dv_ne_dh():
    # distinct, non-monotone key/value maps; SQA-like extra K heads; dv != dh, non-powers of 2
    q, k, v = _qkv(Hk=5, Hv=3, dh=12, dv=20)
    _check_attn(q, k, v, *_maps([4, 0, 4, 2], [1, 2, 0, 1]))


def test_strided_inputs():
    # q/k/v as [B, H, S, d] views of [B, S, H, d] storage
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(dh=12, dv=12))
    assert not q.is_contiguous()
    _check_attn(q, k, v, *_maps([0, 1, 2, 3], [3, 2, 1, 0]))


@pytest.mark.parametrize("Sq,Sk", [(7, 20), (20, 20), (20, 9)])
def test_causal_bottom_right(Sq, Sk):
    q, k, v = _qkv(Hk=2, Hv=2, Sq=Sq, Sk=Sk)
    out = _check_attn(q, k, v, *_maps([0, 0, 1, 1], [1, 0, 1, 0]), causal=True)
    if Sq > Sk:  # first Sq - Sk rows see no key at all
        assert torch.all(out[:, :, : Sq - Sk] == 0)
    # the last row sees every key: same as non-causal
    full = attention_forward(q, k, v, k_map=_maps([0, 0, 1, 1])[0], v_map=_maps([1, 0, 1, 0])[0],
                             scale=q.shape[-1] ** -0.5)
    torch.testing.assert_close(out[:, :, -1], full[:, :, -1], **TOL[q.dtype])


def test_key_padding_with_fully_masked_row():
    q, k, v = _qkv(Sq=5, Sk=19)
    g = torch.Generator().manual_seed(1)
    kpm = (torch.rand(2, 19, generator=g) > 0.4).to(DEVICE)
    kpm[1] = False  # batch 1: every key dropped -> zeros, not NaN
    out = _check_attn(q, k, v, *_maps([0, 1, 2, 3], [0, 1, 2, 3]), key_padding_mask=kpm)
    assert torch.all(out[1] == 0)
    out_c = _check_attn(q, k, v, *_maps([0, 1, 2, 3], [0, 1, 2, 3]), key_padding_mask=kpm,
                        causal=True)
    assert torch.all(out_c[1] == 0)


def test_clipped_softmax():
    q, k, v = _qkv(Hk=2, Hv=2, Sq=11, Sk=18, dh=12, dv=10)
    kpm = torch.ones(2, 18, dtype=torch.bool, device=DEVICE)
    kpm[0, 3:9] = False
    kpm[1] = False
    out = _check_attn(q, k, v, *_maps([0, 1, 1, 0], [1, 1, 0, 0]), clip=(1.05, -0.03),
                      causal=True, key_padding_mask=kpm)
    assert torch.all(out[1] == 0)


def test_clip_identity_equals_softmax():
    q, k, v = _qkv()
    km, vm = _maps([0, 1, 2, 3], [0, 1, 2, 3])
    kw = dict(k_map=km, v_map=vm, scale=0.3, causal=True)
    clipped = attention_forward(q, k, v, clip=(1.0, 0.0), **kw)
    plain = attention_forward(q, k, v, **kw)
    torch.testing.assert_close(clipped, plain, atol=1e-6, rtol=1e-6)


def test_head_scale():
    q, k, v = _qkv(Hk=2, Hv=2)
    hs = torch.rand(2, 4, 13, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _check_attn(q, k, v, *_maps([0, 0, 1, 1], [0, 0, 1, 1]), head_scale=hs)
    _check_attn(q, k, v, *_maps([0, 0, 1, 1], [0, 0, 1, 1]), head_scale=hs, clip=(1.05, -0.03))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = _qkv(Hk=2, Hv=2, dh=12, dv=12, dtype=dtype)
    kpm = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    kpm[0, :5] = False
    hs = torch.rand(2, 4, 13).to(device=DEVICE, dtype=dtype)
    _check_attn(q, k, v, *_maps([0, 0, 1, 1], [1, 0, 0, 1]), causal=True,
                key_padding_mask=kpm, head_scale=hs)
    _check_attn(q, k, v, *_maps([0, 0, 1, 1], [1, 0, 0, 1]), clip=(1.05, -0.03))


# ---------------------------------------------------------------- linear attention


def _check_linear(q, k, v, k_map, v_map, causal):
    out = linear_attention_forward(q, k, v, k_map=k_map, v_map=v_map, causal=causal)
    ref = linear_attention_reference(q, k, v, k_map=k_map, v_map=v_map, causal=causal)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(20, 20), (6, 19), (19, 6)])
def test_linear_attention(causal, Sq, Sk):
    q, k, v = _qkv(Hk=2, Hv=3, Sq=Sq, Sk=Sk, dh=12, dv=10)
    _check_linear(q, k, v, *_maps([0, 1, 1, 0], [2, 0, 1, 2]), causal)


def test_linear_attention_causal_matches_prefix_sums():
    q, k, v = _qkv(Sq=18, Sk=18)
    km, vm = _maps([0, 1, 2, 3], [0, 1, 2, 3])
    out = linear_attention_forward(q, k, v, k_map=km, v_map=vm, causal=True, eps=1e-6)
    fq, fk = torch.relu(q), torch.relu(k)
    kv = torch.cumsum(fk[..., :, None] * v[..., None, :], dim=2)  # [B, H, S, dh, dv]
    z = torch.cumsum(fk, dim=2)
    num = torch.einsum("bhsd,bhsde->bhse", fq, kv)
    den = (fq * z).sum(-1, keepdim=True) + 1e-6
    torch.testing.assert_close(out, num / den, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_half(dtype):
    q, k, v = _qkv(Hk=2, Hv=2, Sq=17, Sk=17, dtype=dtype)
    _check_linear(q, k, v, *_maps([0, 0, 1, 1], [0, 1, 0, 1]), True)


# ---------------------------------------------------------------- refusals


def _attn_call(q, k, v, k_map=None, v_map=None, **kw):
    Hq = q.shape[1]
    if k_map is None:
        k_map = torch.zeros(Hq, dtype=torch.int64, device=DEVICE)
    if v_map is None:
        v_map = torch.zeros(Hq, dtype=torch.int64, device=DEVICE)
    return attention_forward(q, k, v, k_map=k_map, v_map=v_map, scale=1.0, **kw)


def test_refusals():
    q, k, v = _qkv(Sq=4, Sk=4)
    with pytest.raises(ValueError, match="k head_dim 6 does not match q head_dim 8"):
        _attn_call(q, k[..., :6], v)
    with pytest.raises(ValueError, match="v sequence length 3 does not match k sequence length 4"):
        _attn_call(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="k batch size"):
        _attn_call(q, k[:1], v)
    with pytest.raises(ValueError, match="q must be 4-D"):
        _attn_call(q[0], k, v)
    with pytest.raises(ValueError, match=r"k_map must have length Hq=4"):
        _attn_call(q, k, v, k_map=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"v_map must have length Hq=4"):
        _attn_call(q, k, v, v_map=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"k_map index out of range.*\[0, 4\)"):
        _attn_call(q, k, v, k_map=torch.tensor([0, 1, 4, 0]))
    with pytest.raises(ValueError, match=r"v_map index out of range"):
        _attn_call(q, k, v, v_map=torch.tensor([0, -1, 0, 0]))
    with pytest.raises(ValueError, match="k_map must be an integer tensor"):
        _attn_call(q, k, v, k_map=torch.zeros(4))
    with pytest.raises(ValueError, match=r"q head_dim 257 must be in \[1, 256\]"):
        qb, kb, vb = _qkv(Sq=2, Sk=2, dh=257)
        _attn_call(qb, kb, vb)
    with pytest.raises(ValueError, match=r"v head_dim 300 must be in \[1, 256\]"):
        _attn_call(q, k, torch.zeros(2, 4, 4, 300, device=DEVICE))
    with pytest.raises(ValueError, match="q has unsupported dtype torch.float64"):
        _attn_call(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="v dtype torch.float16 does not match q dtype"):
        _attn_call(q, k, v.half())
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Sk\)"):
        _attn_call(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        _attn_call(q, k, v, key_padding_mask=torch.ones(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"head_scale must have shape \(B, Hq, Sq\)"):
        _attn_call(q, k, v, head_scale=torch.ones(2, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="clip must be a pair"):
        _attn_call(q, k, v, clip=(1.0,))
    km = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="feature_map 'elu' is not supported"):
        linear_attention_forward(q, k, v, k_map=km, v_map=km, causal=False, feature_map="elu")
    with pytest.raises(ValueError, match=r"k_map index out of range"):
        linear_attention_forward(q, k, v, k_map=km + 4, v_map=km, causal=True)
