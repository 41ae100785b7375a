"""The family matrix (rewrite/families.py): generated from transformers' auto mappings, never hand-picked.

The whole matrix runs in ``examples/family_matrix.py`` (its table is docs/families.md); here: the generator,
an exact round-trip on a few cheap families that pass, and one refusal that names the feature.
"""
import math

import pytest
import torch

import rewrite
from rewrite import errors, families as fam

# Cheap families that round-trip exactly today (docs/families.md): a RoPE decoder, a GQA decoder with
# qkv biases, GPT-2's fused Conv1D qkv, BERT's encoder with a padding mask, ALBERT's shared layers.
PASSING = ["llama", "qwen2", "gpt2", "bert", "albert"]


def test_families_come_from_the_auto_mappings(monkeypatch):
    from transformers.models.auto import modeling_auto as ma

    names = fam.families()
    assert {"llama", "bert", "gpt2", "t5"} <= set(names)
    assert len(names) > 40
    assert names == sorted(set(names))
    expected = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES) \
        | set(ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    assert set(names) == expected
    # a family a new transformers release adds joins the matrix without anyone listing it
    monkeypatch.setitem(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "zz_new_family", "ZzNewFamilyForCausalLM")
    assert "zz_new_family" in fam.families()


def test_tiny_models_are_tiny():
    model, cfg = fam.tiny_model("llama")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (64, 2, 4, 128)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    model, cfg = fam.tiny_model("gpt2")  # GPT-2 spells them n_embd / n_layer / n_head: the attribute_map
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head) == (64, 2, 4)


def test_rel_err_sees_a_wrong_model():
    """The comparison the matrix relies on must be able to fail."""
    torch.manual_seed(0)
    model, _ = fam.tiny_model("gpt2")
    other, _ = fam.tiny_model("gpt2")
    inputs = fam.make_inputs(model, 3, 13, pad=True, seed=1)
    assert fam.rel_err(model, other, inputs) == 0.0
    with torch.no_grad():
        other.transformer.h[1].attn.c_proj.weight[0, 0] += 1e-2
    assert fam.rel_err(model, other, inputs) > fam.EXACT_TOL


@pytest.mark.parametrize("family", PASSING)
def test_round_trip_is_exact(family):
    model, cfg = fam.tiny_model(family)
    example = fam.make_inputs(model, 2, 8)
    cores = fam.count_attention(model, example)
    layers = cfg.get_text_config().num_hidden_layers
    assert cores == layers == 2  # one self-attention per layer, counted independently of rewrite

    conv = rewrite.convert(model, passes=[], example_inputs=example, progress=False)
    assert len(conv.sites) == cores
    assert conv.report.refusals == []

    plain = fam.make_inputs(model, 3, 13, seed=1)  # neither the traced batch nor the traced length
    padded = fam.make_inputs(model, 3, 13, pad=True, seed=1)
    assert plain["input_ids"].shape == (3, 13) != example["input_ids"].shape
    if "attention_mask" in padded:
        assert padded["attention_mask"][0, 0] == 0 and padded["attention_mask"][-1, -1] == 0
        assert bool(plain["attention_mask"].all())
    err, padded_err = fam.rel_err(model, conv, plain), fam.rel_err(model, conv, padded)
    assert err <= fam.EXACT_TOL, err
    assert padded_err <= fam.EXACT_TOL, padded_err


def test_check_reports_a_pass_with_gqa_and_onnx_parity():
    res = fam.check("gpt2", extended=True)
    assert res.status == "pass" and res.exact
    assert res.sites == res.attention == 2
    assert res.max_err <= fam.EXACT_TOL and res.padded_err <= fam.EXACT_TOL
    assert res.gqa == "ok" and res.onnx == "ok" and res.onnx_err <= fam.ONNX_TOL
    assert "| gpt2 | pass | 2/2 |" in fam.to_markdown([res])
    counts = fam.summary([res])
    assert counts["exact"] == 1 and counts["onnx_ok"] == counts["gqa_ok"] == 1


# A family rewrite refuses today, and the feature its message names: GPT-1's multiplicative causal mask
# (``w·b − 1e4·(1 − b)``). When it is captured, another refusal takes its place. (Gemma-2's tanh soft-cap
# was the refusal here until score modifiers were captured: tests/test_score_modifiers.py.)
REFUSED = ("openai-gpt", "scores are multiplied by a tensor", "transformer.h.0.attn")


def test_a_refused_family_names_the_feature():
    family, feature, module = REFUSED
    res = fam.check(family)  # "refused" only when convert raised a rewrite.errors.RewriteError
    assert res.status == "refused" and not res.exact
    assert res.error == "NoAttentionError"
    cls = getattr(errors, res.error)
    assert issubclass(cls, errors.RewriteError) and cls.__module__ == "rewrite.errors"
    assert feature in res.message
    assert module in res.message  # and the module
    assert res.attention == 2 and res.sites == 0 and math.isnan(res.max_err)
