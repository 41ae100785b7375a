"""ONNX export: every available pass lowers to ONNX and runs in ONNX Runtime like PyTorch.

Each converted model is exported with dynamic batch/sequence axes and checked by ``export_onnx`` on
fresh inputs (another batch size and sequence length than the traced ones): max abs error ≤ 1e-4.
"""
import pytest
import torch

import models
import rewrite
from rewrite.errors import BackendError
from rewrite.pipeline import available

# one spec per pass (DESIGN.md names); passes not yet in rewrite.pipeline.available() are skipped
SPECS = {
    "gqa": "gqa{kv_heads=2}",
    "mqa": "mqa",
    "sqa": "sqa{q_heads=2,kv_heads=2}",
    "dha": "dha{kv_ratio=0.5}",
    "prune-heads": "prune-heads{ratio=0.25}",
    "moh": "moh",
    "masa": "masa",
    "lit": "lit",
    "clipped-softmax": "clipped-softmax{zeta=1.1,gamma=-0.03}",
    "gated-attention": "gated-attention{init=normal,std=0.1}",
}
# BERT covers the other export paths (biases, padding masks, no RoPE) for passes that change the core or gates
BERT_PASSES = ("gqa", "moh", "lit", "clipped-softmax", "gated-attention")
TOL = 1e-4


def _inputs(seq=8):
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 2:] = 0  # right padding
    return {"input_ids": models.ids(2, seq), "attention_mask": mask}


def _calibration():
    return [{"input_ids": models.ids(2, 8, seed=s), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
            for s in range(2)]


def _convert(model, spec):
    name = spec.split("{")[0]
    if name not in available():
        pytest.skip(f"pass {name!r} is not available yet")
    return rewrite.convert(model, passes=spec, example_inputs=_inputs(), calibration=_calibration(),
                           progress=False)


@pytest.mark.parametrize("pass_name", list(SPECS))
def test_llama_pass_exports_and_matches(pass_name, tmp_path):
    conv = _convert(models.llama(kv_heads=4, layers=1), SPECS[pass_name])
    info = conv.export_onnx(str(tmp_path / "m.onnx"))
    assert info["max_abs_err"] <= TOL, info
    assert info["checked_inputs"]["input_ids"] != list(conv.example_inputs["input_ids"].shape)
    assert conv.report.extras["onnx"] is info
    softmax_sites = [op for op in conv.sites if op.score_fn is None]
    assert info["attention_nodes"] == len(softmax_sites)


@pytest.mark.parametrize("pass_name", BERT_PASSES)
def test_bert_pass_exports_and_matches(pass_name, tmp_path):
    conv = _convert(models.bert(), SPECS[pass_name])
    info = conv.export_onnx(str(tmp_path / "m.onnx"))
    assert info["max_abs_err"] <= TOL, info


def test_gqa_model_exports_native_attention_nodes(tmp_path):
    """A GQA model keeps its 2 KV heads in the file: Attention(q_num_heads=4, kv_num_heads=2), no repeat."""
    conv = rewrite.convert(models.llama(kv_heads=2), passes="", example_inputs=_inputs(), progress=False)
    info = conv.export_onnx(str(tmp_path / "gqa.onnx"))
    assert info["attention_nodes"] == 2
    assert info["q_num_heads"] == [4, 4] and info["kv_num_heads"] == [2, 2]
    assert info["gqa"] == "native"
    assert info["max_abs_err"] <= TOL
    assert info["provider"] == "CPUExecutionProvider"
    assert info["inputs"] == ["input_ids", "attention_mask"]
    md = conv.report.to_markdown()
    assert "## onnx" in md and "kv_num_heads" in md


def test_non_contiguous_map_gathers_kv_heads(tmp_path):
    """DHA-style maps (not contiguous blocks) export through Gather with kv_num_heads = Hq."""
    from rewrite.graph import with_sites
    from rewrite.heads import rebuild

    conv = rewrite.convert(models.llama(kv_heads=2, layers=1), passes="", example_inputs=_inputs(),
                           progress=False)
    op = conv.sites[0]
    # interleaved keys (query head i reads key head i % 2), values in another order
    new = rebuild(op, k_map=torch.tensor([0, 1, 0, 1]), v_map=torch.tensor([1, 1, 0, 0]))
    conv.gm = with_sites(conv.gm, {0: new})
    info = conv.export_onnx(str(tmp_path / "dha.onnx"))
    assert info["kv_num_heads"] == [4] and info["gqa"] == "none"
    assert info["max_abs_err"] <= TOL


def test_ort_1_23_0_expands_gqa_or_refuses(tmp_path, monkeypatch):
    """onnxruntime 1.23.0 computes GQA in Attention wrongly on CPU: expand KV heads, or refuse native."""
    import onnxruntime

    conv = rewrite.convert(models.llama(kv_heads=2, layers=1), passes="", example_inputs=_inputs(),
                           progress=False)
    monkeypatch.setattr(onnxruntime, "__version__", "1.23.0")
    with pytest.raises(BackendError, match="1.23.0 computes grouped-query attention.*wrongly"):
        conv.export_onnx(str(tmp_path / "native.onnx"), gqa="native")
    info = conv.export_onnx(str(tmp_path / "expanded.onnx"))
    assert info["gqa"] == "expanded" and info["kv_num_heads"] == [4]
    assert "1.23.0" in info["note"]
    assert info["max_abs_err"] <= TOL


def test_bad_gqa_option_is_refused(tmp_path):
    conv = rewrite.convert(models.llama(kv_heads=2, layers=1), passes="", example_inputs=_inputs(),
                           progress=False)
    with pytest.raises(BackendError, match="gqa='sometimes'"):
        conv.export_onnx(str(tmp_path / "x.onnx"), gqa="sometimes")
