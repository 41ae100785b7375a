"""Mixture-of-experts decoders export to ONNX (transformers' grouped expert matmul has a translation), and
an export failure names its real cause, not the exporter's wrapper."""
import pytest
import torch
import transformers

import rewrite
from rewrite import families
from rewrite.errors import BackendError


@pytest.fixture(scope="module")
def mixtral():
    cfg = families.tiny_config("mixtral")
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    return rewrite.convert(model, passes=["gqa{kv_heads=1}"], example_inputs=(ids,), progress=False)


def test_moe_decoder_exports_and_matches_onnxruntime(mixtral, tmp_path):
    assert any("grouped_mm" in str(n.target) for n in mixtral.gm.graph.nodes)  # the op under test is there
    info = mixtral.export_onnx(str(tmp_path / "moe.onnx"))
    assert info["checked_inputs"]["input_ids"] != [2, 8]  # checked at a shape it was not traced with
    assert info["max_abs_err"] <= 1e-4
    assert info["kv_num_heads"] == [1]


def test_export_failure_names_the_root_cause(mixtral, tmp_path, monkeypatch):
    import rewrite.backends.onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "translations", dict)  # as before the translation existed
    with pytest.raises(BackendError, match=r"ONNX export \(opset 23\) failed: ConversionError: .* Cause: "
                                           r"DispatchError: No ONNX function found for .*grouped_mm_fallback"):
        mixtral.export_onnx(str(tmp_path / "moe.onnx"))
