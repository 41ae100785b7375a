"""The ONNX Runtime backend: same calls and output structure as the PyTorch module, provider gating."""
import pytest
import torch

import models
import rewrite
from rewrite.backends import lower
from rewrite.backends.onnxruntime import CPU, CUDA, OrtModule, attention_problem, choose_provider, lower_onnxruntime
from rewrite.errors import BackendError


def _inputs(batch=2, seq=8, seed=0):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 3:] = 0
    return {"input_ids": models.ids(batch, seq, seed), "attention_mask": mask}


@pytest.fixture(scope="module")
def llama_gqa():
    return models.llama(kv_heads=2, layers=1)


def test_convert_backend_onnxruntime_same_structure_and_values(llama_gqa):
    ort = rewrite.convert(llama_gqa, passes="", example_inputs=_inputs(), backend="onnxruntime", progress=False)
    assert isinstance(ort, OrtModule)
    fresh = _inputs(3, 13, seed=1)
    with torch.no_grad():
        want = llama_gqa(**fresh, use_cache=False)
        got = ort(**fresh)
        got_positional = ort(fresh["input_ids"], fresh["attention_mask"])
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
    assert torch.equal(got.logits, got_positional.logits)
    # the Converted API is still there
    assert ort.report.backend == "onnxruntime"
    extras = ort.report.extras["onnxruntime"]
    assert extras["provider"] == CPU and extras["notes"] == []
    onnx = ort.report.extras["onnx"]  # the causal site as 8 query chunks with native GQA
    assert onnx["causal_chunks"] == 8 and onnx["kv_num_heads"] == [2] * 8
    assert len(ort.sites) == 1 and callable(ort.save) and callable(ort.export_onnx)


def test_bert_tuple_of_outputs_and_threads():
    bert = models.bert()
    conv = rewrite.convert(bert, passes="", example_inputs=_inputs(), progress=False)
    ort = lower_onnxruntime(conv, threads=1)
    fresh = _inputs(1, 5, seed=2)
    with torch.no_grad():
        want, got = bert(**fresh), ort(**fresh)
    assert type(got) is type(want)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    assert (got.pooler_output - want.pooler_output).abs().max().item() <= 1e-4
    assert ort.report.extras["onnxruntime"]["threads"] == 1


def test_ort_1_23_0_gate(llama_gqa, monkeypatch):
    """1.23.0 computes GQA wrongly on CPU: refused when native GQA is asked for, expanded otherwise."""
    import onnxruntime

    conv = rewrite.convert(llama_gqa, passes="", example_inputs=_inputs(), progress=False)
    monkeypatch.setattr(onnxruntime, "__version__", "1.23.0")
    with pytest.raises(BackendError, match=r"refusing to check native GQA: onnxruntime 1\.23\.0 computes"):
        lower_onnxruntime(conv, gqa="native")
    ort = lower_onnxruntime(conv, causal_chunks=1)
    assert ort.report.extras["onnx"]["kv_num_heads"] == [4]  # KV expanded
    assert "expanded" in ort.report.extras["onnxruntime"]["notes"][0]
    assert ort.report.extras["onnx"]["max_abs_err"] <= 1e-4


@pytest.mark.parametrize("version,provider,dtype,masked,expect", [
    ((1, 23, 0), CPU, torch.float32, False, "wrongly on CPU"),
    ((1, 23, 1), CPU, torch.float32, True, None),
    ((1, 24, 2), CUDA, torch.float16, False, "no CUDA kernel"),
    ((1, 26, 0), CUDA, torch.float32, False, "only in fp16/bf16 without a mask"),
    ((1, 25, 1), CUDA, torch.float16, True, "only in fp16/bf16 without a mask"),
    ((1, 25, 1), CUDA, torch.bfloat16, False, None),
    ((1, 27, 0), CUDA, torch.float32, True, None),
])
def test_attention_support_table(version, provider, dtype, masked, expect):
    why = attention_problem(provider, gqa=True, dtype=dtype, masked=masked, version=version)
    assert (why is None) if expect is None else (expect in why)


def test_refusals():
    conv = rewrite.convert(models.bert(), passes="", example_inputs=_inputs(), progress=False)
    with pytest.raises(BackendError, match="unknown backend 'tpu'; valid backends: eager, triton, onnxruntime"):
        lower(conv, "tpu")
    if CUDA not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(BackendError, match="provider 'cuda' is not available here"):
            choose_provider("cuda")
    assert choose_provider("cpu") == CPU
