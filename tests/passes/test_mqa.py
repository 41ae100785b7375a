"""mqa{method}: gqa with one KV head per site: structure, equivalence with gqa{kv_heads=1}, refusals."""
import pytest
import torch

import models
import rewrite
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites
from rewrite.passes.gqa import GQA
from rewrite.passes.mqa import MQA


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen2_mqa():
    # 4 query heads, 2 KV heads, biases, RoPE
    return models.seeded_convert(models.qwen2, "mqa{method=aligned}", (models.ids(2, 8),),
                                 calibration=models.calibration_ids())


def test_mqa_leaves_one_kv_head_per_site(qwen2_mqa):
    model, conv = qwen2_mqa
    before, after = conv.report.to_json()["stages"]
    assert conv.report.pipeline == "mqa{method=aligned}"
    assert (before["kv_heads"], after["kv_heads"], after["q_heads"]) == ([2, 2], [1, 1], [4, 4])
    assert after["kv_cache_bytes_per_token"] * 2 == before["kv_cache_bytes_per_token"]
    assert before["params"] - after["params"] == 2 * 2 * (16 * 64 + 16)  # 2 sites × (K + V) × (weight + bias)
    assert all(op.k_map.tolist() == [0, 0, 0, 0] for op in conv.sites)
    assert after["stats"]["model.layers.0.self_attn"]["groups"] == [[0, 1]]
    assert 0.5 < after["cosine"] < 1.0  # lossy, reported
    with torch.no_grad():  # another batch and length than traced
        assert conv(models.ids(3, 13))[0].shape == (3, 13, models.VOCAB)


def test_mqa_is_gqa_with_one_kv_head():
    _, conv = models.seeded_convert(models.gpt2, [], (models.ids(2, 8),))
    ctx = models.pass_context(conv)
    a, b = sites(MQA().run(conv.gm, ctx).graph), sites(GQA(kv_heads=1).run(conv.gm, ctx).graph)
    for x, y in zip(a, b):
        assert x.k_heads == 1 and torch.equal(x.wk, y.wk) and torch.equal(x.bv, y.bv)
    assert torch.allclose(a[0].wv[0], conv.sites[0].wv.mean(0)) and torch.allclose(a[0].bk[0], conv.sites[0].bk.mean(0))


def test_refusals():
    with pytest.raises(SpecError, match="mqa{method=best}: unknown method; valid: mean, aligned"):
        rewrite.parse_pipeline("mqa{method=best}")
    with pytest.raises(SpecError, match="unknown option 'kv_heads' for pass 'mqa'"):
        rewrite.parse_pipeline("mqa{kv_heads=2}")
    assert MQA(method="aligned").needs_calibration and not MQA().needs_calibration
    with pytest.raises(PassError, match="needs calibration data"):
        models.nanogpt_converted("mqa{method=aligned}")
