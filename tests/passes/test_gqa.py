"""gqa{kv_heads, method=mean|aligned}: structure, exact cases (duplication, alignment before pooling, no-op),
refusals. The lossy quality on the real MiniLM is asserted in test_dha.py (mean < aligned <= dha)."""
from functools import lru_cache

import pytest
import torch
from torch import nn

import models
import rewrite
from rewrite.align import align_heads, apply_head_maps
from rewrite.calibrate import InputStats, input_grams
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.ir import Attention, HeadTransform, SiteInfo
from rewrite.passes.gqa import GQA, merge_site


pytestmark = pytest.mark.usefixtures("one_thread")

FACTORIES = {"llama": lambda: models.llama(4), "qwen2": models.qwen2,
             "gpt2": models.gpt2, "bare": models.BareMHA}


def example(name, batch=2, seq=8, seed=0):
    if name == "bare":  # seq-first (S, B, 64)
        return (torch.randn(seq, batch, 64, generator=torch.Generator().manual_seed(seed)),)
    return (models.ids(batch, seq, seed),)


def calibration(name):
    return [example(name, 1, 10, seed) for seed in range(1, 5)]


@lru_cache(maxsize=None)
def captured(name):
    return models.seeded_convert(FACTORIES[name], [], example(name))



def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def assert_same(model, conv, gm, args):
    """gm (a stage of conv) against the original model, at a batch/seq other than traced."""
    with torch.no_grad():
        ref = first(model(*args))
        got = first(gm(**conv.bind(args, {}), **conv.fixed))
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def stages(conv):
    return conv.report.to_json()["stages"]


# ---- mean pooling --------------------------------------------------------------------------------
def test_mean_pools_contiguous_kv_heads_llama():
    model, _ = captured("llama")
    conv = rewrite.convert(model, "gqa{kv_heads=2}", example_inputs=example("llama"), progress=False)
    before, after = stages(conv)
    assert (before["q_heads"], before["kv_heads"]) == ([4, 4], [4, 4])
    assert (after["q_heads"], after["kv_heads"], after["sites_changed"]) == ([4, 4], [2, 2], 2)
    assert before["params"] - after["params"] == 2 * 2 * (2 * 16 * 64)  # 2 sites × 2 heads × (K + V)
    assert after["kv_cache_bytes_per_token"] * 2 == before["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
    assert after["stats"]["model.layers.0.self_attn"]["groups"] == [[0, 1], [2, 3]]
    wk = model.model.layers[0].self_attn.k_proj.weight.reshape(4, 16, 64)
    op = conv.sites[0]
    assert torch.allclose(op.wk[1], (wk[2] + wk[3]) / 2) and op.k_map.tolist() == [0, 0, 1, 1]
    assert 0.5 < after["cosine"] < 1.0  # lossy, reported
    with torch.no_grad():  # runs at another batch/seq
        assert first(conv(models.ids(3, 13))).shape == (3, 13, models.VOCAB)


def test_mean_on_gqa_model_pools_whole_kv_heads_with_biases():
    model, base = captured("qwen2")  # 4 query heads, 2 KV heads, q/k/v biases
    new = GQA(kv_heads=1).run(base.gm, models.pass_context(base, [])).graph
    op0, op1 = base.sites[0], sites(new)[0]
    assert (op1.k_heads, op1.q_heads, op1.k_map.tolist()) == (1, 4, [0, 0, 0, 0])
    assert torch.allclose(op1.bk[0], op0.bk.mean(0)) and torch.allclose(op1.bv[0], op0.bv.mean(0))


# ---- exact cases -----------------------------------------------------------------------------------
def test_more_kv_heads_duplicates_exactly():
    name = "qwen2"  # GQA with q/k/v biases and RoPE
    model, _ = captured(name)
    conv = rewrite.convert(model, "gqa{kv_heads=4}", example_inputs=example(name), progress=False)
    before, after = stages(conv)
    assert (before["kv_heads"], after["kv_heads"]) == ([2, 2], [4, 4])
    assert after["kv_cache_bytes_per_token"] == 2 * before["kv_cache_bytes_per_token"]
    assert after["cosine"] > 1 - 1e-9
    assert_same(model, conv, conv.gm, example(name, 3, 13, seed=7))


def test_same_kv_heads_is_a_no_op():
    model, base = captured("qwen2")
    result = GQA(kv_heads=2).run(base.gm, models.pass_context(base, []))
    assert result.changed is False and result.stats == {}
    assert all(a is b for a, b in zip(base.sites, sites(result.graph)))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bare"])
def test_alignment_before_pooling_equals_the_original(name):
    """Rotations (RoPE-commuting on Q/K, orthogonal on V/O) and the query-head permutation are exact."""
    model, base = captured(name)
    ctx = models.pass_context(base, calibration(name))
    stats = input_grams(base.gm, ctx.call(base.gm), ctx.calibration)
    n_groups = 1 if name == "qwen2" else 2
    aligned = {i: align_heads(op, stats[i], n_groups).op for i, op in enumerate(base.sites)}
    assert any(not torch.allclose(a.wk, op.wk) for a, op in zip(aligned.values(), base.sites))
    assert_same(model, base, with_sites(base.gm, aligned), example(name, 3, 11, seed=5))


class PartialRope(nn.Module):
    """RoPE on the first ``r`` of d dims, rotate_half (j, j + r/2) or interleaved (2j, 2j + 1) pairs."""

    def __init__(self, r, interleaved):
        super().__init__()
        self.r, self.interleaved = r, interleaved

    def forward(self, x, cos, sin):  # x (B, H, S, d); cos, sin (S, r/2)
        xr, rest = x[..., :self.r], x[..., self.r:]
        if self.interleaved:
            a, b = xr[..., 0::2], xr[..., 1::2]
            xr = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
        else:
            a, b = xr.chunk(2, -1)
            xr = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
        return torch.cat([xr, rest], -1)


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_rope_commuting_rotation_with_partial_rotary_is_exact(layout):
    g = torch.Generator().manual_seed(0)
    hq, hk, d, dim, r = 8, 4, 16, 32, 8  # GQA: two query heads read each KV head
    w = lambda *s: torch.randn(*s, generator=g) / 4  # noqa: E731
    rope = HeadTransform(PartialRope(r, layout == "interleaved"), 2, "rope")
    op = Attention(w(hq, d, dim), w(hk, d, dim), w(hk, d, dim), w(dim, hq, d), w(hq, d), w(hk, d), w(hk, d),
                   w(dim), torch.arange(hq) // 2, scale=d ** -0.5, causal=True, q_transform=rope,
                   k_transform=rope, info=SiteInfo("toy", rope=layout, rotary_dims=r))
    x = torch.randn(3, 12, dim, generator=g)
    ang = torch.arange(12.0)[:, None] * (100.0 ** -torch.arange(r // 2) / (r // 2))[None]
    side = (ang.cos(), ang.sin()) * 2
    st = InputStats(x.reshape(-1, dim).double().T @ x.reshape(-1, dim).double(), x.reshape(-1, dim).double().sum(0),
                    36)
    aligned, groups, original, residual = align_heads(op, st, 2)
    ref = op(x, None, None, *side)
    assert (aligned(x, None, None, *side) - ref).abs().max() <= 1e-5 * ref.abs().max()
    order = [j for members in original for j in members]
    assert groups == [[0, 1], [2, 3]] and aligned.k_map.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (aligned.wk - op.wk[order]).abs().max() > 1e-2  # really rotated, not only re-ordered
    assert residual["k"][1] < residual["k"][0] and residual["v"][1] < residual["v"][0]  # pooling loses less
    q, _ = torch.linalg.qr(torch.randn(hk, d, d, generator=g))  # a generic orthogonal map does not commute
    assert (apply_head_maps(op, q, None)(x, None, None, *side) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_aligned_groups_are_contiguous_and_reported():
    model, _ = captured("llama")
    conv = rewrite.convert(model, "gqa{kv_heads=2,method=aligned}", example_inputs=example("llama"),
                           calibration=calibration("llama"), progress=False)
    after = stages(conv)[1]
    assert after["kv_heads"] == [2, 2] and after["params"] == stages(conv)[0]["params"] - 2 * 2 * 2 * 16 * 64
    st = after["stats"]["model.layers.1.self_attn"]
    assert st["kv_heads_before"] == 4 and sorted(sum(st["groups"], [])) == [0, 1, 2, 3]
    assert st["v_residual_mean_vs_aligned"][1] < st["v_residual_mean_vs_aligned"][0]
    assert all(op.k_map.tolist() == [0, 0, 1, 1] for op in conv.sites)
    assert 0.5 < after["cosine"] < 1.0


# ---- refusals ------------------------------------------------------------------------------------
def test_refuses_kv_heads_that_do_not_divide():
    _, base = captured("llama")
    with pytest.raises(SpecError, match=r"model\.layers\.0\.self_attn: 4 KV heads are not divisible into "
                                        r"kv_heads=3 groups"):
        GQA(kv_heads=3).run(base.gm, models.pass_context(base, []))
    with pytest.raises(SpecError, match="kv_heads=8 is more than its 4 query heads"):
        GQA(kv_heads=8).run(base.gm, models.pass_context(base, []))
    new, stats, diags = merge_site(base.sites[0], 3, "mean")  # per site: a skip diagnostic
    assert new is None and diags[0].level == "skip" and "kv_heads=3" in diags[0].message


def test_refuses_bad_options_at_parse_time():
    with pytest.raises(SpecError, match="kv_heads must be at least 1"):
        rewrite.parse_pipeline("gqa{kv_heads=0}")
    with pytest.raises(SpecError, match="unknown method; valid: mean, aligned"):
        rewrite.parse_pipeline("gqa{kv_heads=2,method=best}")
    with pytest.raises(SpecError, match="gqa needs kv_heads"):
        rewrite.parse_pipeline("gqa")


def test_aligned_needs_calibration():
    assert GQA(kv_heads=2, method="aligned").needs_calibration and not GQA(kv_heads=2).needs_calibration
    _, base = captured("llama")
    with pytest.raises(PassError, match=r"method=aligned\} needs calibration data"):
        GQA(kv_heads=2, method="aligned").run(base.gm, models.pass_context(base, []))
