"""mqa{method}: gqa with one KV head per site: structure, equivalence with gqa{kv_heads=1}, refusals."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rewrite  # noqa: E402
from rewrite.errors import PassError, SpecError  # noqa: E402
from rewrite.graph import sites  # noqa: E402
from rewrite.pass_base import PassContext  # noqa: E402
from rewrite.passes.gqa import GQA  # noqa: E402
from rewrite.passes.mqa import MQA  # noqa: E402
from tests import models  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen2_mqa():
    torch.manual_seed(0)
    model = models.qwen2()  # 4 query heads, 2 KV heads, biases, RoPE
    calib = [(models.ids(1, 10, seed),) for seed in range(1, 5)]
    conv = rewrite.convert(model, "mqa{method=aligned}", example_inputs=(models.ids(2, 8),), calibration=calib,
                           progress=False)
    return model, conv


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
    torch.manual_seed(0)
    model = models.gpt2()
    conv = rewrite.convert(model, passes=[], example_inputs=(models.ids(2, 8),), progress=False)
    ctx = PassContext(calibration=[], captured=conv._captured)
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
        rewrite.convert(models.NanoGPT(), "mqa{method=aligned}", example_inputs=(models.ids(2, 8),), progress=False)
