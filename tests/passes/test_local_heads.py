"""local-heads: structure (whole KV groups become streaming), numerics (exact inside the window, exact for a window
as long as the text), the scores, and refusals."""
import functools

import pytest
import torch

import models as M
import rewrite
from rewrite.api import restage
from rewrite.errors import PassError, SpecError
from rewrite.long_range import passkey_batches
from rewrite.pass_base import PassContext
from rewrite.pipeline import parse


@functools.lru_cache(maxsize=None)
def base():
    """(model, conv) of a tiny GQA LLaMA (4 query heads, 2 KV heads) captured with a padding mask."""
    torch.manual_seed(0)
    model = M.llama(kv_heads=2)
    example = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return model, rewrite.convert(model, passes="", example_inputs=example, progress=False)


def calibration(n=2, seq=24):
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :3] = 0  # left padding in one row
    return [{"input_ids": M.ids(2, seq, seed=s), "attention_mask": mask} for s in range(1, n + 1)]


def _logits(conv, ids, mask):
    with torch.no_grad():
        return conv(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("score", ["distance", "retrieval", "random", "duo"])
def test_half_the_heads_stream_in_whole_kv_groups(score):
    model, conv = base()
    spec = f"local-heads{{ratio=0.5,window=4,sinks=1,score={score},steps=3}}"
    staged, result = M.restage(conv, spec, calibration())
    ops = staged.sites
    total = sum(int((op.window > 0).sum()) for op in ops if op.window is not None)
    assert total == 4  # half of the 8 query heads
    for op in ops:
        if op.window is None:
            continue
        for kv in range(2):  # both query heads of a KV head decided together
            members = op.window[op.k_map == kv]
            assert bool((members == members[0]).all())
        assert set(op.window.tolist()) <= {0, 4} and op.sinks[op.window > 0].tolist() == [1] * int((op.window > 0).sum())
    stats = result.stats
    assert sum(len(s["streaming"]) for s in stats.values()) == 4
    if score != "random":
        assert all(len(s["long_range_score"]) == 4 for s in stats.values())
    # lossy only beyond the window: the first 4 positions of an unpadded row are exact, later ones are not
    ids, mask = M.ids(2, 20, seed=7), torch.ones(2, 20, dtype=torch.long)
    want, got = _logits(conv, ids, mask), _logits(staged, ids, mask)
    assert float((got[:, :4] - want[:, :4]).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((got[:, 8:] - want[:, 8:]).abs().max()) > 1e-4


def test_a_window_as_long_as_the_text_is_exact_with_padding():
    model, conv = base()
    staged, _ = M.restage(conv, "local-heads{heads={0:0/1;1:0/1/2/3},window=20,sinks=2}")
    assert staged.sites[0].window.tolist() == [20, 20, 0, 0] and staged.sites[1].window.tolist() == [20] * 4
    ids, mask = M.ids(3, 17, seed=3), torch.ones(3, 17, dtype=torch.long)
    mask[2, :6] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    got = _logits(staged, ids, mask)
    keep = mask.bool()[:, :, None]
    assert float(((got - want).abs() * keep).max()) <= 1e-5 * float(want.abs().max())


def test_passkey_batches_copy_an_early_segment_past_the_window():
    _, conv = base()
    ctx = PassContext(calibration=calibration(seq=40), captured=conv._captured)
    batches, where = passkey_batches(ctx, window=8, sinks=1)
    for kw, spots in zip(batches, where):
        for r, a, b, m in spots:
            assert b - (a + m) >= 8 and m >= 2
            assert torch.equal(kw["input_ids"][r, b:b + m], kw["input_ids"][r, a:a + m])
    with pytest.raises(PassError, match="long-range copy past window=30"):
        passkey_batches(PassContext(calibration=calibration(seq=24), captured=conv._captured), window=30, sinks=1)


@pytest.mark.parametrize("spec, message", [
    ("local-heads{ratio=0.5,window=0}", r"window=0 must be ≥ 1"),
    ("local-heads{ratio=0.5,sinks=-1}", r"sinks=-1 must be ≥ 0"),
    ("local-heads{ratio=1.0}", r"ratio=1.0 must be in \[0, 1\)"),
    ("local-heads{ratio=-0.1}", r"must be in \[0, 1\)"),
    ("local-heads", "exactly one of ratio"),
    ("local-heads{ratio=0.5,score=entropy}", "unknown score 'entropy'"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)


def test_refusals_at_run_time():
    _, conv = base()
    with pytest.raises(PassError, match="score=distance needs calibration"):
        M.restage(conv, "local-heads{ratio=0.5,score=distance}")
    with pytest.raises(SpecError, match=r"query heads \[0, 1\] .* share one KV head"):
        M.restage(conv, "local-heads{heads={0:1},window=4}")
    with pytest.raises(SpecError, match="no head"):
        M.restage(conv, "local-heads{heads={0:7},window=4}")


def test_encoder_sites_are_refused():
    with pytest.raises(PassError, match="no causal site"):
        rewrite.convert(M.BareMHA(), "local-heads{ratio=0.5,score=random}", example_inputs=(torch.randn(8, 2, 64),),
                        progress=False)


def _greedy_without_cache(conv, ids, mask, steps):
    """The masked full computation: the whole sequence again for every new token; (tokens, last logits)."""
    logits = []
    for _ in range(steps):
        last = _logits(conv, ids, mask)[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
    return ids, logits


def test_bounded_cache_generates_the_masked_full_computation():
    """Layer 0: KV head 0 streams (its 2 query heads), KV head 1 stays full; layer 1: every head streams."""
    from transformers import DynamicCache

    from rewrite.cache import cache_bytes

    _, conv = base()
    staged = restage(conv, "local-heads{heads={0:0/1;1:0/1/2/3},window=3,sinks=2}")
    ids, mask = M.ids(2, 7, seed=5), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding: row 1's sinks are its positions 3 and 4
    cache = DynamicCache()
    out = staged.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, cache=cache)
    want, logits = _greedy_without_cache(staged, ids, mask, 9)
    assert torch.equal(out.sequences, want)
    assert max(float((a - b).abs().max()) for a, b in zip(out.scores, logits)) <= 1e-5
    # 7 + 8 cached tokens (the last new token is not cached); fp32, head_dim 16, K and V, batch 2
    per_slot = 2 * 2 * 16 * 4
    assert cache_bytes(cache) == [per_slot * (15 + (2 + 3)), per_slot * 2 * (2 + 3)]


def test_the_report_shows_the_scores_and_the_split():
    _, conv = base()
    staged = restage(conv, "local-heads{ratio=0.5,window=4,sinks=1,score=distance}", calibration())
    from rewrite.report import _span_heatmaps

    maps = _span_heatmaps(staged.report)
    split = maps["local-heads: streaming heads (1: window 4 + 1 sinks, 0: full)"]
    assert sum(map(sum, split)) == 4 and len(split) == 2
    scores = maps["local-heads: long-range score (distance, window 4)"]
    groups = [((scores[i][g] + scores[i][g + 1]) / 2, split[i][g]) for i in range(2) for g in (0, 2)]  # KV groups
    assert max(s for s, c in groups if c) <= min(s for s, c in groups if not c) + 1e-12  # lowest need streams
    assert staged.report.to_html().count("<img") >= 2
