"""Head importance methods and ``rewrite.analyze``: the numbers, their invariants and the outputs."""
import json
import math

import pytest
import torch

import models as M
import rewrite
from rewrite.analysis import Analysis, attach_heatmaps
from rewrite.api import canonicalize
from rewrite.calibrate import record_site_inputs
from rewrite.capture import capture
from rewrite.errors import PassError
from rewrite.graph import sites
from rewrite.importance import attention_probs, head_importance
from rewrite.pass_base import PassContext
from rewrite.report import Report


@pytest.fixture(scope="module")
def llama_gqa():
    cap = capture(M.llama(2), (M.ids(),))
    gm, _ = canonicalize(cap)
    ctx = PassContext(calibration=[{"input_ids": M.ids(2, 8, seed=s)} for s in range(2)], captured=cap)
    return gm, ctx


def _check_probs(gm, ctx, kw):
    """softmax probabilities times V reproduce the op's own attention core (mask, causal, GQA, scale)."""
    ops = sites(gm)
    for op, recs in zip(ops, record_site_inputs(gm, ctx.call(gm), [kw])):
        x, kv, mask, *side = recs[0].args
        p = attention_probs(op, recs[0].args)  # (B, Hq, Sq, Sk)
        assert torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-5)
        q, k, v = op.project_qkv(x, kv, *side)
        with torch.no_grad():
            want = op.core(q, k, v, mask)
        got = p @ op._expand(v, op.v_map, op._v_group)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    return p


def test_attention_probs_causal_gqa(llama_gqa):
    gm, ctx = llama_gqa
    p = _check_probs(gm, ctx, {"input_ids": M.ids(3, 11, seed=2)})
    assert p.shape == (3, 4, 11, 11) and float(p.triu(1).abs().max()) == 0.0  # causal


def test_attention_probs_with_padding():
    ids, keep = M.ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    keep[1, 6:] = 0
    cap = capture(M.bert(), {"input_ids": ids, "attention_mask": keep})
    gm, _ = canonicalize(cap)
    p = _check_probs(gm, PassContext(captured=cap), {"input_ids": ids, "attention_mask": keep})
    assert float(p[1, :, :, 6:].abs().max()) == 0.0  # padded keys get no attention


def test_importance_methods(llama_gqa):
    gm, ctx = llama_gqa
    ops = sites(gm)
    mag = head_importance(gm, ctx, "magnitude", normalize=False)
    op = ops[1]
    want = torch.stack([op.wo[:, h].norm() * op.wv[op.v_map[h]].norm() for h in range(4)]).double()
    assert torch.allclose(mag[1], want.detach())
    r0, r0b, r1 = (head_importance(gm, None, "random", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0, r0b)) and not torch.equal(r0[0], r1[0])
    for method in ("taylor", "entropy", "magnitude"):
        scores = head_importance(gm, ctx, method)
        assert [s.shape for s in scores] == [(4,), (4,)]
        assert all(abs(float(s.norm()) - 1) < 1e-9 and bool((s >= 0).all()) for s in scores)  # ℓ2 per layer
    assert all(op.head_gate is None for op in sites(gm))  # taylor worked on copies


@pytest.mark.parametrize("method", ["taylor", "entropy"])
def test_calibration_needing_methods_refuse_without_it(llama_gqa, method):
    gm, _ = llama_gqa
    with pytest.raises(PassError, match=f"importance={method} needs calibration data.*calibration="):
        head_importance(gm, PassContext(), method)


def test_taylor_uses_the_models_loss_with_labels():
    model, x = M.llama(2), M.ids()
    cap = capture(model, {"input_ids": x, "labels": x})
    gm, _ = canonicalize(cap)
    batches = [{"input_ids": M.ids(2, 8, seed=s), "labels": M.ids(2, 8, seed=s)} for s in range(2)]
    with_labels = head_importance(gm, PassContext(calibration=batches, captured=cap), "taylor", normalize=False)
    assert all(bool(torch.isfinite(s).all()) and float(s.min()) > 0 for s in with_labels)


def test_analyze_llama(tmp_path):
    calib = [(M.ids(2, 8, seed=s),) for s in range(2)]
    result = rewrite.analyze(M.llama(2), (M.ids(),), calib, progress=False)
    assert isinstance(result, Analysis)
    assert result.sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert result.q_heads == [4, 4] and result.kv_heads == [2, 2]
    for i in range(2):
        assert abs(math.sqrt(sum(v * v for v in result.importance[i])) - 1) < 1e-9
        assert all(0 <= e <= math.log(8) + 1e-6 for e in result.entropy[i])
        assert all(0 <= s <= 1 for s in result.sink[i])
        for sim in (result.k_similarity[i], result.v_similarity[i]):
            assert len(sim) == 2 and abs(sim[0][0] - 1) < 1e-9 and abs(sim[0][1] - sim[1][0]) < 1e-12
            assert 0 <= sim[0][1] <= 1 + 1e-9
    maps = result.heatmaps()
    assert len(maps) == 6 and all(len(m) == 2 for m in maps.values())
    assert result.long_range_window == 2  # a quarter of the 8 calibration tokens
    far = maps["long-range mass (attention beyond a window of 2 + 4 sinks)"]
    assert all(0 <= x <= 1 for row in far for x in row) and any(x > 0 for row in far for x in row)
    assert [len(r) for r in maps["attention entropy (nats)"]] == [4, 4]
    assert [len(r) for r in maps["K redundancy: max CKA to another KV head of the layer"]] == [2, 2]
    data = json.loads(json.dumps(result.to_json()))
    assert data["summary"][0]["site"] == "model.layers.0.self_attn"
    from rich.console import Console

    console = Console(record=True, width=200)
    result.print(console)
    assert "model.layers.1.self_attn" in console.export_text()
    page = result.to_html(str(tmp_path / "analysis.html"))
    assert page.count("<img") >= 5 and (tmp_path / "analysis.html").exists()
    report = attach_heatmaps(Report(pipeline="prune-heads{ratio=0.25}"), result)
    assert set(maps) <= set(report.heatmaps) and "attention analysis" in report.extras
    assert report.to_html().count("<img") >= 5


def test_analysis_pads_ragged_layers():
    a = Analysis(model="m", sites=["a", "b"], q_heads=[2, 1], kv_heads=[2, 1], importance=[[0.6, 0.8], [1.0]],
                 entropy=[[1.0, 2.0], [0.5]], sink=[[0.1, 0.2], [0.3]], k_similarity=[[[1, .5], [.5, 1]], [[1]]],
                 v_similarity=[[[1, .2], [.2, 1]], [[1]]])
    row = a.heatmaps()["attention entropy (nats)"][1]
    assert row[0] == 0.5 and math.isnan(row[1])
    assert a.summary()[0]["most_similar_k"] == [0, 1, .5] and a.summary()[1]["most_similar_v"] is None
