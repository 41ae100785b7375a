"""Per-head attention spans on the canonical op (rewrite.spans): exact when full, a hand-built mask otherwise."""
import functools

import pytest
import torch
import torch.nn.functional as F

import models
import rewrite
from rewrite.api import Converted
from rewrite.errors import SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import rebuild, select_query_heads


def with_spans(conv, window, sinks):
    """``conv`` with every site given ``window``/``sinks`` (ints or per-head lists)."""
    cap = conv._captured
    replace = {i: rebuild(op, window=torch.as_tensor(window).expand(op.q_heads).clone(),
                          sinks=torch.as_tensor(sinks).expand(op.q_heads).clone())
               for i, op in enumerate(sites(cap.gm))}
    return Converted(with_sites(cap.gm, replace), cap, conv.report)


def reference_keep(window, sinks, q_len, k_len, real):
    """The documented rule, one entry at a time: [B, H, Sq, Sk] bool."""
    b, h = real.shape[0], len(window)
    keep = torch.zeros(b, h, q_len, k_len, dtype=torch.bool)
    for n in range(b):
        real_pos = [j for j in range(k_len) if real[n, j]]
        for hh in range(h):
            for i in range(q_len):
                p = k_len - q_len + i
                for j in range(k_len):
                    first = j in real_pos[:sinks[hh]]
                    keep[n, hh, i, j] = window[hh] == 0 or (j <= p and (p - j < window[hh] or first))
    return keep


@functools.lru_cache(maxsize=None)
def _converted(name):
    """(model, conv) of a tiny decoder captured with a padding mask, built once per module."""
    torch.manual_seed(0)
    model = models.llama(kv_heads=2) if name == "llama" else models.qwen2()
    example = {"input_ids": models.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return model, rewrite.convert(model, passes="", example_inputs=example, progress=False)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_all_full_is_the_untouched_fast_path(name, monkeypatch):
    model, conv = _converted(name)
    full = with_spans(conv, 0, 4)  # window 0 everywhere: no span at all
    assert all(op.window is None and op.sinks is None for op in full.sites)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, is_causal=False, **kw: seen.append((attn_mask is None, is_causal))
                        or sdpa(*a, attn_mask=attn_mask, is_causal=is_causal, **kw))
    kw = {"input_ids": models.ids(3, 13, seed=1), "attention_mask": torch.ones(3, 13, dtype=torch.long)}
    with torch.no_grad():
        got, want = full(**kw).logits, conv(**kw).logits
    assert torch.equal(got, want)
    assert seen == [(True, True)] * 4  # both models ran SDPA's is_causal path at both sites


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_window_as_long_as_the_sequence_is_exact(name):
    model, conv = _converted(name)
    spanned = with_spans(conv, 13, 2)
    ids = models.ids(3, 13, seed=2)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        for m in (torch.ones(3, 13, dtype=torch.long), mask):
            want = model(input_ids=ids, attention_mask=m, use_cache=False).logits
            got = spanned(input_ids=ids, attention_mask=m).logits
            keep = m.bool()[:, :, None]
            assert float(((got - want).abs() * keep).max()) <= 1e-5 * float(want.abs().max())


def test_mixed_heads_equal_the_reference_mask():
    _, conv = _converted("llama")
    op = rebuild(conv.sites[0], window=torch.tensor([0, 3, 1, 5]), sinks=torch.tensor([0, 2, 1, 0]))
    g = torch.Generator().manual_seed(0)
    b, sq, sk = 3, 6, 9
    q = torch.randn(b, 4, sq, 16, generator=g)
    k, v = torch.randn(b, 2, sk, 16, generator=g), torch.randn(b, 2, sk, 16, generator=g)
    real = torch.ones(b, sk, dtype=torch.bool)
    real[1, :3] = False  # left padding: row 1's sinks are keys 3 and 4
    causal = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    bool_mask = (real[:, None, None, :] & causal)
    additive = torch.zeros(b, 1, sq, sk).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for mask, rows in ((None, torch.ones(b, sk, dtype=torch.bool)), (bool_mask, real), (additive, real)):
        keep = reference_keep([0, 3, 1, 5], [0, 2, 1, 0], sq, sk, rows) & (causal if mask is None else bool_mask)
        want = F.scaled_dot_product_attention(q, ke, ve, attn_mask=keep, scale=op.scale)
        got = op.core(q, k, v, mask, causal=True if mask is None else None)
        assert torch.allclose(got, want, atol=1e-6), mask if mask is None else mask.dtype
    one = op.core(q[:, :, -1:], k, v, None, causal=True)  # one query at the end (decoding): bottom-right
    keep = reference_keep([0, 3, 1, 5], [0, 2, 1, 0], 1, sk, torch.ones(b, sk, dtype=torch.bool))
    assert torch.allclose(one, F.scaled_dot_product_attention(q[:, :, -1:], ke, ve, attn_mask=keep, scale=op.scale),
                          atol=1e-6)


def test_spans_follow_the_query_heads():
    _, conv = _converted("llama")
    op = rebuild(conv.sites[0], window=torch.tensor([0, 3, 1, 5]), sinks=torch.tensor([0, 2, 1, 0]))
    kept = select_query_heads(op, [1, 3])
    assert kept.window.tolist() == [3, 5] and kept.sinks.tolist() == [2, 0]
    with pytest.raises(ValueError, match="attention spans"):
        rebuild(op, wq=op.wq[:2], wo=op.wo[:, :2])


def test_bad_spans_are_refused():
    op = rewrite_op()
    with pytest.raises(SpecError, match="must be ≥ 1 for a streaming head"):
        op.set_span(torch.tensor([-1, 0, 0, 0]), 0)
    with pytest.raises(SpecError, match="sinks=.* must be ≥ 0"):
        op.set_span(4, -1)
    with pytest.raises(SpecError, match="one entry per query head"):
        op.set_span(torch.tensor([4, 4]), 0)


def rewrite_op():
    return rebuild(_converted("llama")[1].sites[0])


def test_spans_travel_in_the_site_spec():
    import json

    from rewrite.site_spec import op_from_spec, op_spec

    op = rebuild(_converted("llama")[1].sites[0], window=torch.tensor([0, 3, 1, 5]), sinks=torch.tensor([0, 2, 1, 0]))
    again = op_from_spec(json.loads(json.dumps(op_spec(op, {}))), {})
    assert again.window.tolist() == [0, 3, 1, 5] and again.sinks.tolist() == [0, 2, 1, 0]
