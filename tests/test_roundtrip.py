"""convert(model, passes=[]) reproduces every model of the support matrix to fp32 round-off.

Traced at batch 2 / seq 8, checked at batch 3 / seq 13 with and without padding; the number of
canonicalized sites is asserted.
"""
import pytest
import torch

import models as M
import rewrite

TOL = 1e-5


def _hf_inputs(b, s, pad=False):
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[0, : s // 3] = 0  # left padding on the first row
        mask[-1, -2:] = 0  # right padding on the last row
    return {"input_ids": M.ids(b, s, seed=b * 100 + s), "attention_mask": mask}


CASES = {
    # name: (factory, make_inputs(batch, seq, pad), sites)
    "llama-mha": (lambda: M.llama(4), _hf_inputs, 2),
    "llama-gqa": (lambda: M.llama(2), _hf_inputs, 2),
    "llama-gqa-no-mask": (lambda: M.llama(2), lambda b, s, pad=False: {"input_ids": M.ids(b, s)}, 2),
    "qwen2": (M.qwen2, _hf_inputs, 2),
    "qwen3-qk-norm": (M.qwen3, _hf_inputs, 2),
    "gpt2": (M.gpt2, _hf_inputs, 2),
    "bert": (M.bert, _hf_inputs, 2),
    "vit": (M.vit, lambda b, s, pad=False: {"pixel_values": torch.randn(b, 3, 32, 32,
                                                                          generator=torch.Generator().manual_seed(b))}, 2),
    "transformer-encoder": (M.encoder, lambda b, s, pad=False: (torch.randn(b, s, 64),), 2),
    "multihead-attention": (M.BareMHA, lambda b, s, pad=False: (torch.randn(s, b, 64),), 1),
    "nanogpt": (M.NanoGPT, lambda b, s, pad=False: (M.ids(b, s),), 2),
    "minilm": (M.minilm, _hf_inputs, 6),
}


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _call(m, inputs):
    return m(**inputs) if isinstance(inputs, dict) else m(*inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_capture_is_exact_at_other_shapes(name):
    factory, make, n_sites = CASES[name]
    torch.manual_seed(0)
    model = factory()
    conv = rewrite.convert(model, passes=[], example_inputs=make(2, 8), progress=False)
    assert len(conv.sites) == n_sites
    assert conv.report.refusals == []
    for pad in (False, True):
        inputs = make(3, 13, pad) if name not in ("vit",) else make(3, 13)
        with torch.no_grad():
            ref, out = _first(_call(model, inputs)), _first(_call(conv, inputs))
        scale = max(1.0, float(ref.abs().max()))
        assert float((ref - out).abs().max()) <= TOL * scale, name


def test_minilm_inspect_lists_six_sites_of_twelve_heads():
    found = rewrite.inspect(M.minilm(), _hf_inputs(2, 8))
    assert len(found) == 6
    assert all(s.q_heads == 12 and s.kv_heads == 12 and s.head_dim == 32 for s in found)
    assert [s.name for s in found] == [f"encoder.layer.{i}.attention" for i in range(6)]


def test_llama_sites_record_rope_and_gqa():
    conv = rewrite.convert(M.llama(2), passes=[], example_inputs=_hf_inputs(2, 8), progress=False)
    op = conv.sites[0]
    assert (op.q_heads, op.k_heads, op.v_heads, op.head_dim) == (4, 2, 2, 16)
    assert op.info.rope == "rotate_half"
    assert op.k_map.tolist() == [0, 0, 1, 1]


def test_fused_qkv_weights_are_split_per_head():
    model = M.gpt2()
    conv = rewrite.convert(model, passes=[], example_inputs=_hf_inputs(2, 8), progress=False)
    op = conv.sites[0]
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, 3*out)
    assert torch.equal(op.wk.reshape(64, 64), w[:, 64:128].t())
    assert torch.equal(op.wv.reshape(64, 64), w[:, 128:].t())


def test_seq_first_multihead_attention_layout():
    conv = rewrite.convert(M.BareMHA(), passes=[], example_inputs=(torch.randn(8, 2, 64),), progress=False)
    assert conv.sites[0].info.layout == "SBD"


class CrossMHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x, mem):
        return self.a(x, mem, mem, need_weights=False)[0]


def test_cross_attention_multihead():
    model = CrossMHA().eval()
    conv = rewrite.convert(model, passes=[], example_inputs=(torch.randn(2, 8, 64), torch.randn(2, 5, 64)),
                           progress=False)
    assert conv.sites[0].info.cross
    x, mem = torch.randn(3, 11, 64), torch.randn(3, 7, 64)
    assert torch.allclose(conv(x, mem), model(x, mem), atol=1e-5)


def test_bert_decoder_with_cross_attention():
    import transformers

    cfg = transformers.BertConfig(vocab_size=M.VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, is_decoder=True, add_cross_attention=True)
    model = transformers.BertModel(cfg).eval()
    conv = rewrite.convert(model, passes=[], example_inputs={"input_ids": M.ids(2, 8),
                                                             "encoder_hidden_states": torch.randn(2, 6, 64)},
                           progress=False)
    assert [op.info.cross for op in conv.sites] == [False, True]
    ids, enc = M.ids(3, 11), torch.randn(3, 9, 64)
    ref = model(input_ids=ids, encoder_hidden_states=enc, use_cache=False)[0]
    assert torch.allclose(conv(input_ids=ids, encoder_hidden_states=enc)[0], ref, atol=1e-5)


def test_multihead_attention_weights_discarded_by_caller():
    model = M.BareMHA(need_weights=True)
    conv = rewrite.convert(model, passes=[], example_inputs=(torch.randn(8, 2, 64),), progress=False)
    x = torch.randn(11, 3, 64)
    assert len(conv.sites) == 1 and torch.allclose(conv(x), model(x), atol=1e-5)


def phi3():
    """Phi-3: fused qkv, partial_rotary_factor 1.0, so the pass-through part of RoPE is an empty slice."""
    import transformers

    cfg = transformers.Phi3Config(vocab_size=M.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return transformers.Phi3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("pad", [False, True])
def test_phi3_empty_rotary_pass_through_captures_exactly(pad):
    torch.manual_seed(0)
    model = phi3()
    conv = rewrite.convert(model, passes=[], example_inputs=_hf_inputs(2, 8), progress=False)
    assert len(conv.sites) == 2 and conv.report.refusals == []
    assert conv.sites[0].info.rope == "rotate_half" and conv.sites[0].info.rotary_dims == 16
    inputs = _hf_inputs(3, 13, pad)
    assert M.rel_err(model, conv, inputs)[0] <= TOL


def test_sliced_example_inputs_do_not_pin_strides():
    model = M.llama(2)
    long = M.ids(2, 20)
    conv = rewrite.convert(model, passes=[], example_inputs=(long[:, :8],), progress=False)
    assert conv.example_inputs["input_ids"].is_contiguous()
    assert M.rel_err(model, conv, (M.ids(3, 13),))[0] <= TOL
    sliced = M.ids(3, 30, seed=1)[:, 5:18]
    assert not sliced.is_contiguous() and M.rel_err(model, conv, (sliced,))[0] <= TOL
