"""The canonical op's eager core: a causal mask without padding runs as SDPA ``is_causal`` (same function)."""
import pytest
import torch
import torch.nn.functional as F

import models
import rewrite
from rewrite.ir import only_causal


def _calls(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_causal_mask_without_padding_runs_as_is_causal(monkeypatch):
    model = models.llama(kv_heads=2)
    ones = torch.ones(2, 8, dtype=torch.long)
    conv = rewrite.convert(model, passes="", example_inputs={"input_ids": models.ids(2, 8), "attention_mask": ones},
                           progress=False)
    ids = models.ids(3, 13, seed=1)
    padded = torch.ones(3, 13, dtype=torch.long)
    padded[1, :4] = 0
    seen = _calls(monkeypatch)
    for mask, expect in ((torch.ones(3, 13, dtype=torch.long), (True, True)), (padded, (False, False))):
        seen.clear()
        with torch.no_grad():
            got = conv(input_ids=ids, attention_mask=mask).logits
            assert seen == [expect] * 2  # (no mask tensor, is_causal) at both sites
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = mask.bool()[:, :, None]
        assert ((got - want).abs() * keep).max() <= 1e-5 * want.abs().max()


def test_only_causal():
    tri = torch.ones(4, 4, dtype=torch.bool).tril()
    assert only_causal(tri[None, None], 4, 4)
    assert only_causal(torch.zeros(4, 4).masked_fill(~tri, torch.finfo(torch.float32).min), 4, 4)
    padded = tri.clone()
    padded[:, 0] = False
    assert not only_causal(padded, 4, 4)  # padding: the mask must stay
    assert not only_causal(torch.ones(4, 4, dtype=torch.bool), 4, 4)  # bidirectional
    assert not only_causal(tri[:3], 3, 4)  # Sq != Sk: SDPA aligns is_causal top-left


@pytest.mark.parametrize("spec", ["", "gqa{kv_heads=1}"])
def test_saved_program_keeps_the_mask_path(tmp_path, spec):
    """Exported programs (save/load) trace the general mask path: right with and without padding."""
    model = models.llama(kv_heads=2, layers=1)
    conv = rewrite.convert(model, passes=spec, example_inputs=(models.ids(2, 8),), progress=False)
    conv.save(str(tmp_path / "m.pt2"))
    again = rewrite.load(str(tmp_path / "m.pt2"))
    ids = models.ids(3, 11, seed=2)
    with torch.no_grad():
        assert (again(ids).logits - conv(ids).logits).abs().max() <= 1e-5
