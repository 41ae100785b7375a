"""The Triton flash kernel with per-head spans (streaming heads: sinks + window) against the eager op, under the
interpreter: mixed full/streaming heads, causal and padded, prefill and one-token decode; the lowered model."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pytest
import torch

import models as M
import rewrite
from rewrite.backends.triton import attention_forward
from rewrite.backends.triton.flash import _attn_fwd_kernel, sink_ends
from rewrite.backends.triton.lowering import lower_triton
from rewrite.spans import span_keep

DEVICE = M.triton_device(_attn_fwd_kernel)

WINDOW, SINKS = torch.tensor([0, 5, 3, 0]), torch.tensor([0, 2, 1, 0])


def _eager(q, k, v, pad, k_map, scale):
    """SDPA with the documented span rule and causal + padding (bottom-right), as Attention.core computes it."""
    sq, sk = q.shape[2], k.shape[2]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)[None, None]
    if pad is not None:
        keep = keep & pad[:, None, None, :]
    keep = keep & span_keep(WINDOW, SINKS, sq, sk, pad, q.device)
    s = (q @ k[:, k_map].transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return p @ v[:, k_map]


@pytest.mark.parametrize("sq, sk, padded", [(37, 37, True), (1, 37, True), (5, 40, False)])
def test_kernel_matches_eager_for_mixed_heads(sq, sk, padded):
    g = torch.Generator().manual_seed(sq + sk)
    b, d = 2, 16
    k_map = torch.tensor([0, 0, 1, 1], device=DEVICE)
    q = torch.randn(b, 4, sq, d, generator=g).to(DEVICE)
    k, v = (torch.randn(b, 2, sk, d, generator=g).to(DEVICE) for _ in range(2))
    pad = None
    if padded:
        pad = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
        pad[1, :20] = False  # left padding beyond a 16-key tile: row 1's sinks are keys 20 and 21
    got = attention_forward(q, k, v, k_map=k_map, v_map=k_map, scale=0.25, causal=True, key_padding_mask=pad,
                            window=WINDOW, sinks=SINKS)
    want = _eager(q, k, v, pad, k_map, 0.25)
    rows = torch.ones(b, sq, dtype=torch.bool) if pad is None else pad[:, sk - sq:].cpu()
    assert float(((got - want).abs().cpu() * rows[:, None, :, None]).max()) <= 1e-5


def test_sink_ends_count_real_keys():
    pad = torch.tensor([[True] * 6, [False, False, True, False, True, True]])
    ends = sink_ends(torch.tensor([0, 1, 2, 3]), pad, 2, 6)
    assert ends.tolist() == [[0, 1, 2, 3], [0, 3, 5, 6]]


def test_lowered_local_heads_match_eager():
    torch.manual_seed(0)
    model = M.llama(kv_heads=2, layers=1)
    example = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    conv = rewrite.convert(model, "local-heads{heads={0:0/1},window=4,sinks=1}", example_inputs=example,
                           progress=False)
    lowered = lower_triton(conv)
    ids, mask = M.ids(2, 18, seed=4), torch.ones(2, 18, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        want = conv(input_ids=ids, attention_mask=mask).logits
        got = lowered(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()[:, :, None]
    assert float(((got - want).abs() * keep).max()) <= 1e-4 * float(want.abs().max())
