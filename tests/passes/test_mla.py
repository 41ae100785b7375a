"""mla{kv_rank, rope_dims, method}: MHA/GQA → multi-head latent attention (issue 14)."""
from __future__ import annotations

import pytest
import torch

import models as M
import rewrite
from rewrite.api import restage
from rewrite.errors import PassError, RewriteError, SpecError
from rewrite.latent import LatentAttention

FAMILIES = {"llama-mha": lambda: M.llama(kv_heads=4), "llama-gqa": lambda: M.llama(kv_heads=2), "qwen2": M.qwen2,
            "qwen3": M.qwen3}
CALIBRATION = [{"input_ids": M.ids(1, 16, s), "attention_mask": torch.ones(1, 16, dtype=torch.long)} for s in range(1, 5)]


def padded(batch=3, seq=11):
    ids = M.ids(batch, seq, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def convert(model, spec, calibration=True):
    torch.manual_seed(0)
    return rewrite.convert(model, spec, example_inputs={"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}, progress=False,
                           calibration=CALIBRATION if calibration else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_with_every_rope_dim_is_exact(family):
    model = FAMILIES[family]()
    conv = convert(model, "mla", calibration=False)
    cfg = model.config
    g, dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for op in conv.sites:
        assert isinstance(op, LatentAttention)
        assert (op.q_heads, op.rope_heads, op.rope_dim, op.nope_dim, op.kv_rank) == (4, g, dh, 0, g * dh)
        assert op.kv_cache_bytes_per_token(2) == 2 * 2 * g * dh  # the GQA cache, as latent + RoPE keys
    assert conv.report.stages[-1].kv_cache_bytes_per_token == conv.report.stages[0].kv_cache_bytes_per_token
    for inputs in (padded(), {"input_ids": M.ids(1, 5, seed=2), "attention_mask": torch.ones(1, 5, dtype=torch.long)}):  # other batches and lengths than traced
        err, _ = M.rel_err(model, conv, inputs)
        assert err <= 1e-5, err


def test_partial_rope_and_low_rank_report_their_error():
    model = M.llama(kv_heads=2)
    width = 2 * (16 - 8) + 2 * 16  # non-RoPE keys and values of the two KV heads
    errors = {}
    for rank in (width, width // 2, width // 4):
        conv = convert(model, f"mla{{kv_rank={rank},rope_dims=8}}")
        st = conv.report.stages[-1]
        assert st.kv_cache_bytes_per_token == 4 * 2 * (rank + 2 * 8)  # fp32, two layers, (r + G·rope_dims) values
        site = st.stats["model.layers.0.self_attn"]
        assert (site["kv_rank"], site["rope_dims"], site["kv_width"]) == (rank, 8, width)
        assert len(site["rope_pairs_kept"]) == 2 and all(len(p) == 8 for p in site["rope_pairs_kept"])
        errors[rank] = M.rel_err(model, conv, padded())[0]
        assert 0 < errors[rank] < 1, errors  # an approximation, with a finite error
    # more rank, less error; full rank keeps only the RoPE truncation
    assert errors[width] < errors[width // 2] < errors[width // 4], errors


def test_latent_cache_decodes_token_for_token():
    model = M.llama(kv_heads=2)
    conv = convert(model, "mla{kv_rank=24,rope_dims=8}")
    ids = padded(batch=2, seq=7)
    out = conv.generate(ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=8, do_sample=False,
                        pad_token_id=0)
    # the same tokens from the uncached computation, one full forward per token
    seq, mask = ids["input_ids"], ids["attention_mask"]
    for _ in range(8):
        with torch.no_grad():
            logits = conv(input_ids=seq, attention_mask=mask)
        logits = logits.logits if hasattr(logits, "logits") else logits[0]
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask[:, :1] * 0 + 1], 1)
    assert torch.equal(out, seq)
    hf = conv.to_transformers()
    with torch.no_grad():
        cache = hf(seq, attention_mask=mask, use_cache=True).past_key_values
    for layer in cache.layers:  # (kv_rank + G·rope_dims) values per token, never per-head K/V
        assert tuple(layer.keys.shape) == (2, 1, 15, 24) and tuple(layer.values.shape) == (2, 2, 15, 8)
    assert sum(layer.keys[0].numel() + layer.values[0].numel() for layer in cache.layers) == (24 + 2 * 8) * 2 * 15


def test_refusals():
    model = M.llama(kv_heads=2)
    base = convert(model, "", calibration=False)  # one capture; every spec below restages it
    qwen3 = convert(M.qwen3(), "", calibration=False)
    with pytest.raises(SpecError, match=r"rope_dims must be even"):
        rewrite.parse_pipeline("mla{rope_dims=7}")
    with pytest.raises(SpecError, match=r"no site can take it: model\.layers\.0\.self_attn: kv_rank=49 is larger "
                                        r"than its non-RoPE K/V width 48"):
        restage(base, "mla{kv_rank=49,rope_dims=8}", CALIBRATION)
    with pytest.raises(SpecError, match=r"rope_dims=18 is larger than its head size 16"):
        restage(base, "mla{rope_dims=18}", CALIBRATION)
    for spec in ("mla{rope_dims=8}", "mla{kv_rank=16}"):  # the lossy parts read calibration statistics
        with pytest.raises(RewriteError, match=rf"pass '{spec}' needs calibration data; pass calibration="):
            restage(base, spec)
    with pytest.raises(PassError, match=r"mla\{kv_rank=16\}: kv_rank=16 below the K/V width 32 \(whitened "
                                        r"factorisation\) needs calibration data"):
        M.restage(base, "mla{kv_rank=16}")  # the pass itself, run on a captured graph without calibration
    with pytest.raises(PassError, match=r"mla\{method=transmla\}: RoRoPE over 2 KV heads \(one shared RoPE key from "
                                        r"the PCA of the keys; the rest of the keys lose their RoPE\) needs calibration"):
        M.restage(base, "mla{method=transmla}")  # several KV heads: the PCA reads calibration statistics
    with pytest.raises(SpecError, match=r"no site can take it: model\.layers\.0\.self_attn: kv_rank=41 is larger "
                                        r"than its non-RoPE K/V width 40"):  # 2·(16 − 16) + (2 − 1)·8 + 2·16
        restage(base, "mla{kv_rank=41,method=transmla}", CALIBRATION)
    with pytest.raises(SpecError, match=r"mla\{method=transmla\} rotates the RoPE frequency planes across KV heads, "
                                        r"which needs a pure RoPE on q and k .*\(this site has a q/k norm\); use "
                                        r"method=mha2mla"):
        restage(qwen3, "mla{method=transmla}", CALIBRATION)
    with pytest.raises(SpecError, match=r"has no RoPE, so rope_dims=8 has nothing to keep"):
        convert(M.gpt2(), "mla{rope_dims=8}")
    with pytest.raises(SpecError, match=r"a pure RoPE on q and k \(this site has a q/k norm\)"):
        restage(qwen3, "mla{rope_dims=8}", CALIBRATION)


def test_cross_attention_is_refused():
    t = pytest.importorskip("transformers")
    cfg = t.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    model = t.BartModel(cfg).eval()
    ids = M.ids(2, 6) % 64
    conv = rewrite.convert(model, "mla", example_inputs={"input_ids": ids, "decoder_input_ids": ids}, progress=False)
    skipped = [d for d in conv.report.stages[-1].diagnostics if "cross-attention" in d]
    assert len(skipped) == 1 and "mla needs self-attention" in skipped[0]
    assert sum(isinstance(op, LatentAttention) for op in conv.sites) == 2  # encoder and decoder self-attention


def qwen2_mqa_with_biases():
    t = pytest.importorskip("transformers")
    cfg = t.Qwen2Config(vocab_size=M.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = t.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # q, k and v biases that matter (they start at zero)
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2-biases"])
def test_transmla_is_exact_on_mqa_with_one_shared_rope_key(family):
    model = M.llama(kv_heads=1) if family == "llama" else qwen2_mqa_with_biases()
    conv = convert(model, "mla{method=transmla}", calibration=False)  # G = 1 at full rank: no statistics needed
    for op in conv.sites:  # the DeepSeek form: one RoPE key of every rotary dim, the latent holds the values
        assert isinstance(op, LatentAttention) and not op.rope_map.any()
        assert (op.rope_heads, op.rope_dim, op.nope_dim, op.kv_rank, tuple(op.w_kr.shape)) == (1, 16, 0, 16, (1, 16, 64))
        assert (op.b_kr is None) == (family == "llama")
    assert conv.report.stages[-1].kv_cache_bytes_per_token == conv.report.stages[0].kv_cache_bytes_per_token
    for inputs in (padded(), {"input_ids": M.ids(1, 5, seed=2), "attention_mask": torch.ones(1, 5, dtype=torch.long)}):
        err, _ = M.rel_err(model, conv, inputs)
        assert err <= 1e-5, err


def test_transmla_on_gqa_reports_its_error_and_decodes_with_one_rope_key():
    model = M.llama(kv_heads=2)
    errors, convs = {}, {}
    base = convert(model, "")  # one capture; every spec restages it
    for spec in ("mla{method=transmla}", "mla{kv_rank=24,rope_dims=8,method=mha2mla}",
                 "mla{kv_rank=24,rope_dims=8,method=transmla}"):
        convs[spec] = conv = restage(base, spec, CALIBRATION)
        errors[spec] = M.rel_err(model, conv, padded())[0]
    st = convs["mla{kv_rank=24,rope_dims=8,method=mha2mla}"].report.stages[-1].stats["model.layers.0.self_attn"]
    site = conv.report.stages[-1].stats["model.layers.0.self_attn"]
    assert (site["kv_values_after"], site["rope_pairs_kept"], st["kv_values_after"]) == (24 + 8, "first 4", 24 + 2 * 8)
    assert 1 / 2 < site["rope_energy_shared"] < 1  # the shared key holds most, not all, of the planes' key energy
    # full rank loses only the RoPE of the rest of the keys; on this random model both partial forms are close
    assert 0 < errors["mla{method=transmla}"] < 0.05 and all(0 < e < 1 for e in errors.values()), errors
    ids = padded(batch=2, seq=7)
    out = conv.generate(ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=6, do_sample=False,
                        pad_token_id=0)
    with torch.no_grad():
        cache = conv.to_transformers()(out, attention_mask=torch.ones_like(out), use_cache=True).past_key_values
    for layer in cache.layers:  # the latent and one shared RoPE key: (24 + 8) values per token and layer
        assert tuple(layer.keys.shape) == (2, 1, 13, 24) and tuple(layer.values.shape) == (2, 1, 13, 8)
    seq, mask = ids["input_ids"], ids["attention_mask"]
    for _ in range(6):  # the same tokens from the uncached computation
        with torch.no_grad():
            logits = M.first_output(conv, {"input_ids": seq, "attention_mask": mask})
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask[:, :1] * 0 + 1], 1)
    assert torch.equal(out, seq)
