"""ONNX decoder with past KV: one graph for prompt and steps, at the converted head counts, checked in ORT."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

import models as M
import rewrite
from rewrite.hf_adapter import GenerationError

GREEDY = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def converted(model, spec):
    calibration = [(M.ids(2, 16, seed=s),) for s in (3, 4)]
    return rewrite.convert(model, spec, example_inputs=(M.ids(2, 8),), calibration=calibration, progress=False)


def left_padded():
    ids = M.ids(3, 9, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def past_shapes(folder: str) -> dict:
    graph = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


@pytest.mark.parametrize("spec,kv_heads", [("gqa{kv_heads=1},gated-attention,clipped-softmax", 1),
                                           ("sqa{q_heads=2,kv_heads=2},moh{active_ratio=0.5,router=qnorm}", 2)])
def test_decoder_generates_as_the_converted_model(tmp_path, spec, kv_heads):
    conv = converted(M.llama(kv_heads=4), spec)
    info = conv.export_onnx(str(tmp_path), decoder=True)
    assert info["max_abs_err"] < 1e-4 and len(info["checked"]) == 3  # other batch/past/new shapes, empty past
    shapes = past_shapes(str(tmp_path))
    assert shapes["past_key_values.0.key"] == ["batch_size", kv_heads, "past_sequence_length", 16]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert conv.report.extras["onnx_decoder"]["genai"]["written"]
    ids, mask = left_padded()
    dec = rewrite.load_onnx_decoder(str(tmp_path), threads=1)
    assert torch.equal(dec.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0),
                       conv.generate(ids, attention_mask=mask, **GREEDY))
    one = ids[2:, 3:]  # batch 1, a sliced prompt
    assert torch.equal(dec.generate(one, max_new_tokens=10, pad_token_id=0), conv.generate(one, **GREEDY))


def test_linear_attention_exports_its_fixed_state_and_genai_is_refused(tmp_path):
    conv = converted(M.llama(kv_heads=2, layers=1), "lit")  # one layer: the state layout is per layer
    with pytest.raises(GenerationError, match=r"genai_config.json cannot be written: LiT layers keep a fixed-size "
                                              r"state \(S, z\), not a KV cache"):
        conv.export_onnx(str(tmp_path / "refused"), decoder=True, genai=True)
    info = conv.export_onnx(str(tmp_path / "lit"), decoder=True)
    assert info["max_abs_err"] < 1e-4 and not info["genai"]["written"]
    assert not os.path.exists(tmp_path / "lit" / "genai_config.json")
    shapes = past_shapes(str(tmp_path / "lit"))
    assert shapes["past_key_values.0.key"] == ["batch_size", 2, 16, 16]  # S per (k, v) head pair: no token axis
    assert shapes["past_key_values.0.value"] == ["batch_size", 2, 16]
    dec = rewrite.load_onnx_decoder(str(tmp_path / "lit"), threads=1)
    ids, mask = left_padded()
    assert torch.equal(dec.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0),
                       conv.generate(ids, attention_mask=mask, **GREEDY))
    logits, present = dec.step(ids[:1], np.ones((1, 9)), np.arange(9)[None], dec.empty_past(1))
    assert [p.shape for p in present] == [p.shape for p in dec.empty_past(1)]  # the state does not grow


def test_dha_per_layer_non_contiguous_maps_decode_but_genai_says_why_not(tmp_path):
    conv = converted(M.llama(kv_heads=4), "dha{kv_ratio=0.5}")
    assert conv.sites[0].k_map.tolist() == [0, 1, 2, 0]  # query heads 0 and 3 share key head 0: not blocks
    info = conv.export_onnx(str(tmp_path), decoder=True)
    assert [(layer["key"][0], layer["value"][0]) for layer in info["layers"]] == [
        (op.k_heads, op.v_heads) for op in conv.sites] == [(3, 3), (1, 1)]  # budgets moved to layer 0
    assert info["genai"] == {"written": False, "reason": "ONNX Runtime GenAI 0.18 allocates KV outputs with one "
                             "global head count; the layers have [3, 1] KV heads (use rewrite.load_onnx_decoder)"}
    assert info["max_abs_err"] < 1e-4
    dec = rewrite.load_onnx_decoder(str(tmp_path), threads=1)
    ids, mask = left_padded()
    assert torch.equal(dec.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0),
                       conv.generate(ids, attention_mask=mask, **GREEDY))


def test_cli_decoder_folder_generates_the_same_tokens_in_genai(tmp_path, capsys):
    import onnxruntime_genai as og  # the dev extra installs it
    from rewrite.cli import main

    assert main(["convert", "models:llama", "--passes", "gqa{kv_heads=1}", "--onnx", str(tmp_path), "--decoder"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"ONNX decoder with past key values: {tmp_path} (max abs err vs PyTorch" in out
    assert "genai_config.json written" in out
    config = json.load(open(tmp_path / "genai_config.json"))
    assert config["model"]["decoder"]["num_key_value_heads"] == 1
    ids = M.ids(1, 9, seed=1)
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=9 + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    ours = rewrite.load_onnx_decoder(str(tmp_path)).generate(ids, max_new_tokens=10)  # = conv.generate (above)
    assert np.array_equal(np.asarray(gen.get_sequence(0)), ours[0].numpy())


def test_decoder_export_refuses_what_cannot_decode(tmp_path):
    bert = rewrite.convert(M.bert(), [], example_inputs=(M.ids(2, 8),), progress=False)
    with pytest.raises(GenerationError, match="encoder-only or base model that cannot generate.*"
                                              r"conv.export_onnx\('model.onnx'\)"):
        bert.export_onnx(str(tmp_path / "bert"), decoder=True)
    conv = converted(M.llama(kv_heads=2), "gqa{kv_heads=1}")
    with pytest.raises(GenerationError, match="opset 21: the decoder export needs opset 23 or newer"):
        conv.export_onnx(str(tmp_path / "old"), decoder=True, opset=21)
    assert not os.path.exists(tmp_path / "bert") and not os.path.exists(tmp_path / "old")
