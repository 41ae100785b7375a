"""ONNX decoder of multi-head latent attention (issue 14): the past per layer is the latent c [B, 1, T, r] and the
RoPE key [B, R, T, dr], read in the absorbed form with MatMul/Softmax; ONNX Runtime generates as conv.generate."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

import models as M
import rewrite
from rewrite import families as fam
from rewrite.hf_adapter import GenerationError

LOGITS_TOL = 1e-4  # max abs logit difference, ONNX Runtime vs PyTorch (fp32)


def _deepseek():
    torch.manual_seed(0)
    model = fam.model_class("deepseek_v3")(fam.tiny_config("deepseek_v3")).eval()
    return rewrite.convert(model, passes=[], example_inputs=fam.make_inputs(model, 2, 8), progress=False)


def _mla_llama():
    calibration = [{"input_ids": M.ids(1, 16, s), "attention_mask": torch.ones(1, 16, dtype=torch.long)} for s in (1, 2)]
    torch.manual_seed(0)
    return rewrite.convert(M.llama(kv_heads=2), "mla{kv_rank=24,rope_dims=8}", progress=False,
                           example_inputs={"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
                           calibration=calibration)


MODELS = {"deepseek-v3": _deepseek, "mla-llama": _mla_llama}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    conv = MODELS[request.param]()
    folder = str(tmp_path_factory.mktemp(request.param))
    return conv, folder, conv.export_onnx(folder, decoder=True)


def _graph_inputs(folder: str) -> dict:
    graph = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def test_latent_decoder_generates_as_the_converted_model(exported):
    conv, folder, info = exported
    ops = conv.sites
    assert info["max_abs_err"] < LOGITS_TOL and len(info["checked"]) == 3  # other batch/past/new, an empty past
    assert [layer["kind"] for layer in info["layers"]] == ["latent"] * len(ops)
    shapes = _graph_inputs(folder)
    for i, op in enumerate(ops):  # the latent (r) and the RoPE keys (R heads of dr): not H·d per token
        assert shapes[f"past_key_values.{i}.key"] == ["batch_size", 1, "past_sequence_length", op.kv_rank]
        assert shapes[f"past_key_values.{i}.value"] == ["batch_size", op.rope_heads, "past_sequence_length", op.rope_dim]
    model = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    kinds = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    assert "Attention" not in kinds and "Einsum" not in kinds and {"MatMul", "Softmax"} <= kinds
    assert not info["genai"]["written"] and "multi-head latent attention layers cache the latent" in info["genai"]["reason"]
    assert not os.path.exists(os.path.join(folder, "genai_config.json"))

    vocab = conv.hf_model().config.vocab_size
    ids = torch.randint(1, vocab, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    dec = rewrite.load_onnx_decoder(folder, threads=1)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = conv.generate(ids, attention_mask=mask, **greedy)
    assert torch.equal(dec.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0), out)

    # the prompt's logits, then one step on the present: PyTorch's to LOGITS_TOL; the present grows by one token
    position = np.where(mask.numpy() == 0, 0, mask.numpy().cumsum(-1) - 1)
    logits, present = dec.step(ids.numpy(), mask.numpy(), position, dec.empty_past(3))
    step_mask = np.concatenate([mask.numpy(), np.ones((3, 1), np.int64)], 1)
    logits2, present2 = dec.step(out[:, 9:10].numpy(), step_mask, position[:, -1:] + 1, present)
    with torch.no_grad():
        ref = conv.hf_model()(out[:, :10], attention_mask=torch.from_numpy(step_mask)).logits
    keep = mask.bool()
    assert np.abs(logits - ref[:, :9].numpy())[keep.numpy()].max() < LOGITS_TOL  # padded rows carry no meaning
    assert np.abs(logits2[:, -1] - ref[:, 9].numpy()).max() < LOGITS_TOL
    for i, op in enumerate(ops):
        assert present2[2 * i].shape == (3, 1, 10, op.kv_rank)
        assert present2[2 * i + 1].shape == (3, op.rope_heads, 10, op.rope_dim)


def test_latent_decoder_refuses_genai_by_name(exported, tmp_path):
    conv, _, _ = exported  # refused before anything is exported
    with pytest.raises(GenerationError, match=r"genai_config.json cannot be written: multi-head latent attention "
                                              r"layers cache the latent c \[B, 1, T, r\] and the RoPE key"):
        conv.export_onnx(str(tmp_path / "genai"), decoder=True, genai=True)
