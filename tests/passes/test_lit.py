"""lit: the linear-attention core against a direct sum; causal (llama, nanoGPT), padding (bert) and grid
(vit) sites; weights inherited or re-initialised; error on the real MiniLM; refusals."""
import pytest
import torch
from torch import nn

import models as M
import rewrite
from rewrite.errors import SpecError
from rewrite.graph import count_params
from rewrite.heads import contiguous_map
from rewrite.ir import Attention
from rewrite.pass_base import PassContext
from rewrite.passes.lit import LinearAttention, classify_mask
from test_roundtrip import _hf_inputs


def _op(hq=4, hk=2, d=8, dim=16, causal=False):
    g = torch.Generator().manual_seed(0)
    w = lambda *s: torch.randn(*s, generator=g) / dim ** 0.5  # noqa: E731
    return Attention(w(hq, d, dim), w(hk, d, dim), w(hk, d, dim), w(dim, hq, d), k_map=contiguous_map(hq, hk),
                     scale=d ** -0.5, causal=causal)


def _restage(conv, spec):
    """Run ``spec`` on the captured graph of ``conv`` without capturing again: (ops, PassResult)."""
    (p,) = rewrite.parse_pipeline(spec)
    result = p.run(conv._captured.gm, PassContext(captured=conv._captured))
    return rewrite.graph.sites(result.graph), result


def _direct(q, k, v, keep, causal, eps=1e-6):
    """O_t = Σ_j a_tj v_j / (Σ_j a_tj + ε), a_tj = relu(q_t)·relu(k_j) over the keys t may read."""
    a = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # (B, H, Sq, Sk)
    a = a * keep[:, None, None, :]
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [6, 70])  # 70: two causal chunks of 64, the second padded
def test_core_matches_the_direct_sum_with_padding_and_gqa(causal, seq):
    op = _op(causal=causal)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, seq, 8, generator=g) for h in (4, 2, 2))
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, seq - 2:] = False  # right padding on the second row
    mask = keep[:, None, None, :].expand(2, 1, seq, seq)
    if causal:
        mask = mask & torch.ones(seq, seq, dtype=torch.bool).tril()
    out = LinearAttention(causal=causal)(op, q, k, v, mask)
    ref = _direct(q, op._expand(k, op.k_map, 2), op._expand(v, op.v_map, 2), keep.float(), causal)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.allclose(LinearAttention(causal=causal)(op, q, k, v, additive), ref, atol=1e-5, rtol=1e-4)
    if causal:  # decoding: the last 3 queries against all keys, bottom-right aligned
        tail = LinearAttention(causal=True)(op, q[:, :, -3:], k, v, mask[:, :, -3:])
        assert torch.allclose(tail, ref[:, :, -3:], atol=1e-5, rtol=1e-4)


def test_mask_classification():
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False
    pad = keep[:, None, None, :].expand(2, 1, 5, 5)
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    assert classify_mask(None) == "none"
    assert classify_mask(pad) == "padding"
    assert classify_mask(pad & tril) == "causal"
    assert classify_mask(torch.zeros(2, 1, 5, 5).masked_fill(~(pad & tril), -1e9)) == "causal"
    band = (torch.arange(5)[:, None] - torch.arange(5)[None, :]).abs() <= 1
    assert classify_mask(band[None, None]) is None
    assert classify_mask(torch.randn(1, 1, 5, 5)) is None  # an additive bias, not a mask


def test_llama_is_causal_and_position_t_ignores_later_tokens():
    torch.manual_seed(0)
    model = M.llama(2)
    conv = rewrite.convert(model, "lit", example_inputs=_hf_inputs(2, 8), progress=False)
    stage = conv.report.to_json()["stages"][-1]
    assert not stage["exact"] and stage["sites_changed"] == 2
    assert all(s["causal"] and s["conv"] == "off" for s in stage["stats"].values())
    assert stage["params"] == conv.report.stages[0].params  # same weights, no new ones
    a = M.ids(2, 12, seed=3)
    b = a.clone()
    b[:, 7:] = M.ids(2, 5, seed=4)
    ones = torch.ones_like(a)
    with torch.no_grad():
        la, lb = conv(input_ids=a, attention_mask=ones).logits, conv(input_ids=b, attention_mask=ones).logits
    assert torch.isfinite(la).all()
    assert torch.allclose(la[:, :7], lb[:, :7], atol=1e-5)
    assert not torch.allclose(la[:, 7:], lb[:, 7:], atol=1e-3)


def test_nanogpt_causal_mask_is_recognized():
    conv = rewrite.convert(M.NanoGPT().eval(), "lit", example_inputs=(M.ids(),), progress=False)
    stats = conv.report.to_json()["stages"][-1]["stats"]
    assert [s["causal"] for s in stats.values()] == [True, True]


def test_bert_padding_keys_contribute_nothing():
    torch.manual_seed(0)
    conv = rewrite.convert(M.bert(), "lit", example_inputs=_hf_inputs(2, 8), progress=False)
    stats = conv.report.to_json()["stages"][-1]["stats"]
    assert all(not s["causal"] and s["conv"] == "off" for s in stats.values())
    x = _hf_inputs(3, 10, pad=True)
    y = dict(x, input_ids=x["input_ids"].masked_fill(x["attention_mask"] == 0, 5))  # other ids under padding
    with torch.no_grad():
        a, b = conv(**x).last_hidden_state, conv(**y).last_hidden_state
    kept = x["attention_mask"].bool()
    assert torch.isfinite(a).all()
    assert torch.allclose(a[kept], b[kept], atol=1e-5)


def test_vit_gets_a_zero_initialised_conv_on_the_patch_grid():
    torch.manual_seed(0)
    model = M.vit()
    px = {"pixel_values": torch.randn(2, 3, 32, 32)}
    conv = rewrite.convert(model, "lit", example_inputs=px, progress=False)
    _, off = _restage(conv, "lit{conv=off}")
    stage = conv.report.to_json()["stages"][-1]
    assert [s["conv"] for s in stage["stats"].values()] == ["3x3 on 4x4 grid, 1 class tokens"] * 2
    assert stage["params"] - count_params(off.graph) == 2 * 64 * (9 + 1)  # depthwise 3x3 + bias, 2 sites
    with torch.no_grad():
        plain_out = off.graph(**px, **conv.fixed).last_hidden_state
        assert torch.equal(conv(**px).last_hidden_state, plain_out)  # zero init: a no-op
        op = conv.sites[0]
        nn.init.normal_(op.score_fn.conv.weight)
        q, k, v = (torch.randn(2, 4, 17, 16) for _ in range(3))
        with_conv = op.score_fn(op, q, k, v, None)
        plain = rewrite.graph.sites(off.graph)[0].score_fn(op, q, k, v, None)
    assert torch.equal(with_conv[:, :, 0], plain[:, :, 0])  # the class token gets no conv term
    assert not torch.allclose(with_conv[:, :, 1:], plain[:, :, 1:])


def test_inherit_false_reinitialises_with_a_seed():
    torch.manual_seed(0)
    model = M.llama(4)
    conv = rewrite.convert(model, [], example_inputs={"input_ids": M.ids()}, progress=False)
    (a, _), _ = _restage(conv, "lit{inherit=false,seed=3}")
    (b, _), _ = _restage(conv, "lit{inherit=false,seed=3}")
    (c, _), _ = _restage(conv, "lit")
    original = model.model.layers[0].self_attn.q_proj.weight.reshape(4, 16, 64)
    assert torch.equal(a.wq, b.wq) and not torch.allclose(a.wq, original)
    assert float(a.wq.abs().max()) <= 64 ** -0.5
    assert torch.equal(c.wq, original) and c.wq is not conv.sites[0].wq  # inherited: a copy


def test_minilm_error_is_bounded():
    model = M.minilm()
    conv = rewrite.convert(model, "lit", example_inputs=_hf_inputs(4, 12, pad=True), progress=False)
    stage = conv.report.to_json()["stages"][-1]
    assert stage["sites_changed"] == 6 and all(not s["causal"] for s in stage["stats"].values())
    assert 0.3 < stage["cosine"] < 0.999  # linear attention is not softmax: lossy until distilled


class CrossAttention(nn.Module):
    """Self-attention over x, then cross-attention from x to a memory."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(64, 4, batch_first=True)
        self.memory = nn.Linear(64, 64)

    def forward(self, x, mem):
        x = x + self.self_attn(x, x, x, need_weights=False)[0]
        m = self.memory(mem)
        return x + self.cross(x, m, m, need_weights=False)[0]


class Banded(nn.Module):
    """Self-attention with a sliding-window mask: neither causal nor padding."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        i = torch.arange(64)
        self.register_buffer("far", (i[:, None] - i[None, :]).abs() > 2)

    def forward(self, x):
        s = x.shape[1]
        return self.attn(x, x, x, attn_mask=self.far[:s, :s], need_weights=False)[0]


def test_refusals():
    with pytest.raises(SpecError, match="unknown feature map; valid: relu, elu"):
        rewrite.parse_pipeline("lit{feature_map=tanh}")[0].check_options()
    with pytest.raises(SpecError, match="conv must be auto, on or off"):
        rewrite.parse_pipeline("lit{conv=maybe}")[0].check_options()
    with pytest.raises(SpecError, match="eps must be positive"):
        rewrite.parse_pipeline("lit{eps=0}")[0].check_options()
    example = (torch.randn(2, 8, 64), torch.randn(2, 5, 64))
    conv = rewrite.convert(CrossAttention().eval(), "lit", example_inputs=example, progress=False)
    assert [op.info.cross for op in conv.sites] == [False, True]
    stage = conv.report.to_json()["stages"][-1]
    assert stage["sites_changed"] == 1 and conv.sites[1].score_fn is None
    assert stage["diagnostics"] == ["skip: cross: lit does not support cross-attention at cross"]
    conv = rewrite.convert(Banded().eval(), "lit", example_inputs=(torch.randn(2, 8, 64),), progress=False)
    assert conv.report.stages[-1].sites_changed == 0
    assert "lit needs a causal or padding mask at attn" in conv.report.stages[-1].diagnostics[0]
    conv = rewrite.convert(M.NanoGPT().eval(), [], example_inputs=(M.ids(),), progress=False)
    _, result = _restage(conv, "lit{conv=on}")
    assert not result.changed
    assert "lit conv=on needs a 2-D token grid at blocks.0, but it is causal" in str(result.diagnostics[0])


def test_hedgehog_maps_match_their_direct_sum_decode_from_the_state_and_save(tmp_path):
    """φ(x) = [softmax(xW+b), softmax(−xW−b)] per head (query maps per query head, key maps per key head): the
    chunked core equals the direct sum with those features; decoding from the (2d × dv) state equals the full
    forward token for token; the maps train and travel through a saved folder."""
    torch.manual_seed(0)
    op = _op(causal=True)
    fn = LinearAttention("hedgehog", causal=True, q_heads=4, k_heads=2, head_dim=8)
    with torch.no_grad():
        for p in fn.maps.values():
            p.add_(torch.randn(p.shape) * 0.3)  # away from the identity start
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 70, 8, generator=g) for h in (4, 2, 2))
    fq, fk = fn.phi(q, "q"), op._expand(fn.phi(k, "k"), op.k_map, 2)
    assert fq.shape == (2, 4, 70, 16) and torch.allclose(fq.sum(-1), torch.full((2, 4, 70), 2.0))
    a = (fq @ fk.transpose(-1, -2)).tril()
    ref = (a @ op._expand(v, op.v_map, 2)) / (a.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(fn(op, q, k, v, None), ref, atol=1e-5, rtol=1e-4)

    model = M.llama(kv_heads=2)
    conv = rewrite.convert(model, "lit{feature_map=hedgehog}", example_inputs=(M.ids(2, 8),), progress=False,
                           verify=False)
    site = conv.sites[0]
    assert site.score_fn.maps["wq"].shape == (site.q_heads, site.head_dim, site.head_dim)
    assert site.score_fn.maps["wk"].shape[0] == site.k_heads and site.score_fn.feature_dim == 2 * site.head_dim
    assert conv.report.to_json()["stages"][-1]["state_bytes"] == len(conv.sites) * site.k_heads * (
        2 * site.head_dim * site.v_head_dim + 2 * site.head_dim) * 4
    before = site.score_fn.maps["wq"].detach().clone()
    rewrite.distill(conv, model, [{"input_ids": M.ids(2, 12, seed=s)} for s in range(2)], steps=2, lr=1e-2,
                    transfer_steps=2, progress=False)
    assert not torch.equal(site.score_fn.maps["wq"], before)  # the maps are trained
    ids = M.ids(1, 7, seed=3)
    with torch.no_grad():
        full = conv(ids).logits
        out = conv.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        again = conv(out).logits  # the generated tokens are the full forward's argmax at each step
    assert torch.equal(out[0, 7:], again[0, 6:-1].argmax(-1)) and torch.allclose(again[:, :7], full, atol=1e-5)
    from transformers import AutoModelForCausalLM

    assert conv.save_pretrained(str(tmp_path / "hh"))["kind"] == "custom"
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hh")).eval()(ids).logits
    assert torch.allclose(reloaded, full, atol=1e-5)


def _hybrid_direct(fn, op, q, k, v, keep, window):
    """o_t = (Σ_{t−W<j≤t} γ e^{s−m} v_j + Σ_{j≤t−W} φq·φk v_j) / (the same sums without v), over all S×S."""
    kq, vq = op._expand(k, op.k_map, 2), op._expand(v, op.v_map, 2)
    s = (q @ kq.transpose(-1, -2)) * op.scale
    lag = torch.arange(q.shape[2])[:, None] - torch.arange(q.shape[2])[None, :]
    win = (lag >= 0) & (lag < window) & keep[:, None, None, :]
    lin = (lag >= window) & keep[:, None, None, :]
    e = torch.exp(s - s.masked_fill(~win, float("-inf")).amax(-1, keepdim=True)).masked_fill(~win, 0)
    linear = fn.phi(q, "q") @ op._expand(fn.phi(k, "k"), op.k_map, 2).transpose(-1, -2)
    a = e * fn.gamma().view(1, -1, 1, 1) + linear * lin
    return (a @ vq) / a.sum(-1, keepdim=True)


def _window_fn(window, seed=0):
    torch.manual_seed(seed)
    fn = LinearAttention("hedgehog", causal=True, q_heads=4, k_heads=2, head_dim=8, window=window)
    with torch.no_grad():  # away from the start: γ_h ≠ 1/2, maps ≠ identity
        fn.window_gate.normal_()
        for p in fn.maps.values():
            p.add_(torch.randn(p.shape) * 0.3)
    return fn


@pytest.mark.parametrize("seq,window", [(70, 5), (130, 64), (70, 66)])  # windows inside a chunk, across chunks
def test_window_hybrid_matches_its_direct_sum_with_left_padding_and_gqa(seq, window):
    from rewrite.passes.lit import _causal_chunked
    from rewrite.window_linear import hybrid_sums

    op, fn = _op(causal=True), _window_fn(window)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, seq, 8, generator=g) for h in (4, 2, 2))
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, :3] = False  # left padding: rows 0..2 of the second sequence are unused
    mask = keep[:, None, None, :] & torch.ones(seq, seq, dtype=torch.bool).tril()
    out, ref = fn(op, q, k, v, mask), _hybrid_direct(fn, op, q, k, v, keep, window)
    assert torch.allclose(out[0], ref[0], atol=2e-6) and torch.allclose(out[1, :, 3:], ref[1, :, 3:], atol=2e-6)
    assert fn(op, q, k, v, mask.logical_not().float() * -1e9)[0].sub(out[0]).abs().max() < 1e-6  # additive mask
    tail = fn(op, q[:, :, -3:], k, v, mask[:, :, -3:])  # fewer queries than keys: the last 3 positions
    assert torch.allclose(tail, out[:, :, -3:], atol=1e-6)
    # W = 0 in the same sums: all keys on the linear side, today's causal linear attention exactly
    fq, fk = fn.phi(q, "q"), op._expand(fn.phi(k, "k"), op.k_map, 2)
    vq = op._expand(v, op.v_map, 2)
    num, den = hybrid_sums(q, op._expand(k, op.k_map, 2), vq, fq, fk, None, op.scale, 0, fn.gamma())
    want = _causal_chunked(fq, fk, vq)
    assert torch.equal(num, want[0]) and torch.equal(den, want[1])


def test_window_at_least_the_sequence_is_softmax_attention():
    """W ≥ S: the linear sum is empty and γ_h (here random per head) cancels in every row."""
    op, fn = _op(causal=True), _window_fn(200)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, h, 70, 8, generator=g) for h in (4, 2, 2))
    keep = torch.ones(3, 70, dtype=torch.bool)
    keep[2, 60:] = False  # right padding
    mask = keep[:, None, None, :] & torch.ones(70, 70, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, op._expand(k, op.k_map, 2), op._expand(v, op.v_map, 2),
                                                            attn_mask=mask, scale=op.scale)
    assert float(fn.gamma().detach().std()) > 0.1
    assert torch.allclose(fn(op, q, k, v, mask), want, atol=1e-6)


def test_window_decodes_from_a_bounded_cache_exactly():
    """Prefill then steps of 1, 1, 3 and the rest at batch 3 with left padding equals the full forward; the cache
    holds the last W keys/values and the state, and its bytes are what the report states."""
    from transformers import DynamicCache

    from rewrite.cache import LayerCache, WindowStateLayer, cache_bytes

    op, fn = _op(causal=True), _window_fn(6)
    op.score_fn = fn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 23, 16, generator=g)
    keep = torch.ones(3, 23, dtype=torch.bool)
    keep[1, :4] = False
    mask = keep[:, None, None, :] & torch.ones(23, 23, dtype=torch.bool).tril()
    with torch.no_grad():
        full = op(x, None, mask)
        cache, outs, pos = DynamicCache(), [], 0
        for n in (5, 1, 1, 3, 13):
            outs.append(op(x[:, pos:pos + n], None, mask[:, :, pos:pos + n, :pos + n], cache=LayerCache(cache, 0)))
            pos += n
    assert torch.allclose(torch.cat(outs, 1)[keep], full[keep], atol=1e-6)
    layer = cache.layers[0]
    assert isinstance(layer, WindowStateLayer) and layer.get_seq_length() == 23
    assert layer.win_k.shape == (3, 2, 6, 8) and layer.keys.shape == (3, 2, 16, 8)  # (B, pairs, 2d features, dv)
    assert cache_bytes(cache)[0] == 3 * op.state_bytes() and op.kv_cache_bytes_per_token() == 0
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    assert layer.win_k.shape[0] == 3 and layer.keys.shape[0] == 3


def test_window_pass_generates_saves_and_is_refused_where_not_lowered(tmp_path):
    from transformers import AutoModelForCausalLM

    from rewrite.errors import BackendError
    from rewrite.hf_adapter import GenerationError

    torch.manual_seed(0)
    model = M.llama(kv_heads=2)
    conv = rewrite.convert(model, "lit{feature_map=hedgehog,window=4}", example_inputs=(M.ids(2, 8),), progress=False,
                           verify=False)
    stage = conv.report.to_json()["stages"][-1]
    site = conv.sites[0]
    assert all(s["window"] == 4 for s in stage["stats"].values())
    d = site.head_dim  # per site: the maps W [H, d, d] and b [H, 1, d] of query and key heads, and γ per query head
    assert stage["params"] - conv.report.stages[0].params == len(conv.sites) * (
        (site.q_heads + site.k_heads) * (d * d + d) + site.q_heads)
    rewrite.distill(conv, model, [{"input_ids": M.ids(2, 12, seed=s)} for s in range(2)], steps=2, lr=1e-2,
                    transfer_steps=2, progress=False)
    assert float(site.score_fn.window_gate.abs().max()) > 0  # γ trains
    ids = M.ids(1, 9, seed=3)
    with torch.no_grad():
        out = conv.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        again = conv(out).logits
    assert torch.equal(out[0, 9:], again[0, 8:-1].argmax(-1))  # decoding from the bounded cache = full forward
    assert conv.save_pretrained(str(tmp_path / "w"))["kind"] == "custom"
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "w")).eval()(out).logits
    assert torch.allclose(reloaded, again, atol=1e-5)
    with pytest.raises(BackendError, match="lit window=4 .sliding-window softmax . linear attention, LoLCATs. has no "
                                           "Triton kernel"):
        from rewrite.backends.triton.lowering import site_kind
        site_kind(site)
    with pytest.raises(GenerationError, match="lit window=4 .* has no ONNX decoder lowering"):
        conv.export_onnx(str(tmp_path / "dec"), decoder=True)
    with pytest.raises(SpecError, match="window must be an integer >= 0"):
        rewrite.parse_pipeline("lit{window=-1}")[0].check_options()
    bert = rewrite.convert(M.bert(), [], example_inputs=_hf_inputs(2, 8), progress=False)
    _, result = _restage(bert, "lit{window=4}")
    assert not result.changed
    assert "lit window=4 needs a causal site; " in str(result.diagnostics[0]) and "is bidirectional" in str(
        result.diagnostics[0])
