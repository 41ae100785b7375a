"""ONNX export: every available pass lowers to ONNX and runs in ONNX Runtime like PyTorch.

Each converted model is exported with dynamic batch/sequence axes and checked by ``export_onnx`` on
fresh inputs (another batch size and sequence length than the traced ones): max abs error ≤ 1e-4.
"""
import functools

import pytest
import torch

import models
import rewrite
from rewrite.api import restage
from rewrite.errors import BackendError

# every pass lowers in one of these pipelines (DESIGN.md names); two passes per export where they compose
SPECS = {
    "gqa+refit-query+gated-attention": "gqa{kv_heads=2},refit-query,gated-attention{init=normal,std=0.1}",
    "mqa+clipped-softmax": "mqa,clipped-softmax{zeta=1.1,gamma=-0.03}",
    "sqa+refit-output": "sqa{q_heads=2,kv_heads=2},refit-output",
    "dha+moh": "dha{kv_ratio=0.5},moh",
    "prune-heads": "prune-heads{ratio=0.25}",
    "masa+lit": "lit,masa{atoms=1,refine_rank=4}",  # masa last: lit rebuilds owned weights
    "local-heads": "local-heads{ratio=0.5,window=3,sinks=1,score=random}",  # per-head span masks
    "mla": "mla",  # the exact GQA -> MLA form: a latent of the KV heads, up-projections, decoupled RoPE keys
}
# BERT covers the other export paths (biases, padding masks, no RoPE) for passes that change the core or gates
BERT_SPECS = {"lit": "lit", "clipped-softmax+gated-attention":
              "clipped-softmax{zeta=1.1,gamma=-0.03},gated-attention{init=normal,std=0.1}"}
TOL = 1e-4


def _inputs(seq=8):
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 2:] = 0  # right padding
    return {"input_ids": models.ids(2, seq), "attention_mask": mask}


def _calibration():
    return [{"input_ids": models.ids(2, 8, seed=s), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
            for s in range(2)]


@functools.lru_cache(maxsize=None)
def _captured(family: str, layers: int = 1):
    """One capture per model (verified by ``convert``); each pipeline restages it (``rewrite.api.restage``)."""
    model = models.llama(kv_heads=4, layers=layers) if family == "llama" else models.bert(layers=layers)
    return rewrite.convert(model, passes="", example_inputs=_inputs(), progress=False)


def _convert(family: str, spec: str, layers: int = 1):
    return restage(_captured(family, layers), spec, calibration=_calibration())


def test_every_pass_is_exported_by_a_pipeline():
    from rewrite.pipeline import available

    covered = {name for key in SPECS for name in key.split("+")}
    assert set(available()) <= covered, sorted(set(available()) - covered)


@pytest.mark.parametrize("pass_name", list(SPECS))
def test_llama_pass_exports_and_matches(pass_name, tmp_path):
    layers = 2 if "masa" in pass_name else 1  # MASA shares weight atoms across layers
    conv = _convert("llama", SPECS[pass_name], layers)
    info = conv.export_onnx(str(tmp_path / "m.onnx"))
    assert info["max_abs_err"] <= TOL, info
    assert info["checked_inputs"]["input_ids"] != list(conv.example_inputs["input_ids"].shape)
    assert conv.report.extras["onnx"] is info
    # one standard Attention node per softmax site; GQA stays native (K/V heads never repeated)
    softmax = [op for op in conv.sites if op.score_fn is None]
    assert info["attention_nodes"] == len(softmax)
    assert info["q_num_heads"] == [op.q_heads for op in softmax]
    assert info["kv_num_heads"] == [op.k_heads if op._k_group and op.k_heads == op.v_heads and op._v_group
                                    else op.q_heads for op in softmax]
    if pass_name.startswith("gqa"):
        assert info["gqa"] == "native" and info["kv_num_heads"] == [2]
    if pass_name.startswith("masa"):
        assert any(".weights.refine.wq_a" in name for name, _ in conv.gm.named_parameters())


@pytest.mark.parametrize("pass_name", list(BERT_SPECS))
def test_bert_pass_exports_and_matches(pass_name, tmp_path):
    conv = _convert("bert", BERT_SPECS[pass_name])
    info = conv.export_onnx(str(tmp_path / "m.onnx"))
    assert info["max_abs_err"] <= TOL, info
    assert info["inputs"] == ["input_ids", "attention_mask"]
    assert len(info["outputs"]) == 2  # last_hidden_state, pooler_output
    assert "## onnx" in conv.report.to_markdown()


@pytest.fixture(scope="module")
def llama_gqa():
    """A natively GQA model (4 query heads, 2 KV heads), captured without passes."""
    return rewrite.convert(models.llama(kv_heads=2, layers=1), passes="", example_inputs=_inputs(), progress=False)


def test_non_contiguous_map_gathers_kv_heads(llama_gqa, tmp_path):
    """DHA-style maps (not contiguous blocks) export through Gather with kv_num_heads = Hq."""
    from rewrite.graph import with_sites
    from rewrite.heads import rebuild

    conv = llama_gqa
    op = conv.sites[0]
    # interleaved keys (query head i reads key head i % 2), values in another order
    new = rebuild(op, k_map=torch.tensor([0, 1, 0, 1]), v_map=torch.tensor([1, 1, 0, 0]))
    original = conv.gm
    conv.gm = with_sites(original, {0: new})
    try:
        info = conv.export_onnx(str(tmp_path / "dha.onnx"))
    finally:
        conv.gm = original  # the fixture is shared
    assert info["kv_num_heads"] == [4] and info["gqa"] == "none"
    assert info["max_abs_err"] <= TOL


def test_ort_1_23_0_refuses_native_gqa(llama_gqa, tmp_path, monkeypatch):
    """onnxruntime 1.23.0 computes GQA in Attention wrongly on CPU (the fallback is tested with the backend)."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.23.0")
    with pytest.raises(BackendError, match="1.23.0 computes grouped-query attention.*wrongly.*gqa='expand'"):
        llama_gqa.export_onnx(str(tmp_path / "native.onnx"), gqa="native")
    assert not (tmp_path / "native.onnx").exists()


def test_bad_gqa_option_is_refused(llama_gqa, tmp_path):
    with pytest.raises(BackendError, match="gqa='sometimes': expected 'auto', 'native' or 'expand'"):
        llama_gqa.export_onnx(str(tmp_path / "x.onnx"), gqa="sometimes")
