"""Calibration statistics leave padding out: a right-padded batch gives the same Σxxᵀ, Σx and token
count as its sentences run one by one without padding."""
import pytest
import torch

import models
import rewrite
from rewrite.calibrate import input_grams, real_keys
from rewrite.pass_base import PassContext


def _stats(conv, batches):
    ctx = PassContext(calibration=[conv.bind((), b) for b in batches], captured=conv._captured)
    return input_grams(conv.gm, ctx.call(conv.gm), ctx.calibration)


@pytest.mark.parametrize("factory", [lambda: models.llama(kv_heads=2), models.bert])
def test_padding_tokens_are_left_out(factory):
    torch.manual_seed(0)  # the weights do not depend on which tests ran before in this worker
    ids = models.ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # the second sentence has 5 tokens
    conv = rewrite.convert(factory(), passes="", example_inputs={"input_ids": ids, "attention_mask": mask},
                           progress=False)
    padded = _stats(conv, [{"input_ids": ids, "attention_mask": mask}])
    alone = _stats(conv, [{"input_ids": ids[:1], "attention_mask": mask[:1]},
                          {"input_ids": ids[1:, :5], "attention_mask": mask[1:, :5]}])
    for p, a in zip(padded, alone):
        assert p.count == a.count == 13
        scale = max(1.0, float(p.gram.abs().max()))  # fp32 activations of other batch shapes: round-off
        torch.testing.assert_close(p.gram, a.gram, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(p.total, a.total, rtol=1e-5, atol=1e-6 * scale)


def test_real_keys_reads_bool_and_additive_masks():
    keep = torch.tensor([[True, True, False]])[:, None, None, :].expand(1, 1, 3, 3)
    assert real_keys(keep, 1, 3).tolist() == [[True, True, False]]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]  # every key seen by some query
    assert real_keys(causal, 2, 3).tolist() == [[True] * 3] * 2
    additive = torch.zeros(2, 1, 1, 3)
    additive[0, ..., 0] = torch.finfo(torch.float32).min
    assert real_keys(additive, 2, 3).tolist() == [[False, True, True], [True, True, True]]
    assert real_keys(None, 2, 3) is None
