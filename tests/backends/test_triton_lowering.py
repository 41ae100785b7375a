"""Triton lowering matches eager on tiny models (kernels in the CPU interpreter, TRITON_INTERPRET=1)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` (conftest sets it too)

import pytest
import torch

import models
import rewrite
from rewrite.backends import lower
from rewrite.backends.triton.lowering import TritonModule, TritonSite, lower_triton, split_mask
from rewrite.errors import BackendError
from rewrite.backends.triton.flash import _attn_fwd_kernel
from rewrite.pipeline import available

DEVICE = models.triton_device(_attn_fwd_kernel)
TOL = 1e-4


def _on(model):
    return model.to(DEVICE)


def _inputs(batch=2, seq=8, seed=0, left=0, right=0):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left:
        mask[0, :left] = 0
    if right:
        mask[-1, seq - right:] = 0
    return {"input_ids": models.ids(batch, seq, seed).to(DEVICE), "attention_mask": mask.to(DEVICE)}


def _check(model, passes="", inputs=None, fresh=None, calibration=None):
    inputs = inputs or _inputs(right=2)
    conv = rewrite.convert(_on(model), passes=passes, example_inputs=inputs, calibration=calibration,
                           progress=False)
    tri = lower(conv, "triton")
    assert isinstance(tri, TritonModule) and tri.report.backend == "triton"
    fresh = fresh or inputs
    with torch.no_grad():
        want, got = conv(**fresh), tri(**fresh)
    assert type(got) is type(want)
    keep = fresh["attention_mask"].bool() if "attention_mask" in fresh else slice(None)
    err = (got[0] - want[0])[keep].abs().max().item()  # padded query rows carry no meaning
    assert err <= TOL, err
    return tri


def test_llama_gqa_causal_and_padding():
    tri = _check(models.llama(kv_heads=2), fresh=_inputs(3, 11, seed=1, left=3, right=2))
    assert set(tri.report.extras["triton"]["sites"].values()) == {"softmax"}
    assert len(tri.sites) == 2 and callable(tri.save)


def test_llama_causal_without_mask():
    _check(models.llama(kv_heads=2, layers=1), inputs={"input_ids": models.ids(2, 8).to(DEVICE)},
           fresh={"input_ids": models.ids(1, 13, seed=3).to(DEVICE)})


def test_bert_padding():
    _check(models.bert(), fresh=_inputs(3, 9, seed=2, right=4))


@pytest.mark.parametrize("spec", ["clipped-softmax{zeta=1.1,gamma=-0.03}", "gated-attention{init=normal,std=0.1}",
                                  "moh", "sqa{q_heads=2,kv_heads=1}", "dha{kv_ratio=0.5}", "masa{atoms=1}"])
def test_passes_lower(spec):
    if spec.split("{")[0] not in available():
        pytest.skip(f"pass {spec} not available yet")
    calib = [_inputs(seed=s) for s in range(2)]
    layers = 2 if spec.startswith("masa") else 1  # MASA shares weight atoms across layers
    tri = _check(models.llama(kv_heads=4, layers=layers), spec, calibration=calib)
    if spec.startswith("clipped"):
        assert set(tri.report.extras["triton"]["sites"].values()) == {"clipped"}


def test_linear_attention_causal():
    if "lit" not in available():
        pytest.skip("pass lit not available yet")
    tri = _check(models.llama(kv_heads=2, layers=1), "lit", inputs={"input_ids": models.ids(2, 8).to(DEVICE)},
                 fresh={"input_ids": models.ids(3, 19, seed=4).to(DEVICE)})
    assert set(tri.report.extras["triton"]["sites"].values()) == {"linear"}


def test_linear_attention_with_padding_is_refused():
    if "lit" not in available():
        pytest.skip("pass lit not available yet")
    conv = rewrite.convert(_on(models.bert()), passes="lit", example_inputs=_inputs(right=2), progress=False)
    tri = lower_triton(conv)
    with pytest.raises(BackendError, match="encoder.layer.0.attention: key padding masks with linear attention"):
        tri(**_inputs(right=2))


def test_unsupported_masks_are_refused():
    b, s = 2, 6
    per_head = torch.ones(b, 4, s, s, dtype=torch.bool)
    with pytest.raises(BackendError, match="site L0: per-head mask"):
        split_mask(per_head, b, s, s, False, "L0")
    alibi = -torch.arange(s, dtype=torch.float32).expand(b, 1, s, s).contiguous()
    with pytest.raises(BackendError, match="site L0: additive mask holds values other than 0 and -inf"):
        split_mask(alibi, b, s, s, False, "L0")
    window = torch.ones(s, s, dtype=torch.bool).tril().triu(-2)  # sliding window
    with pytest.raises(BackendError, match="neither key padding nor key padding \\+ causal"):
        split_mask(window, b, s, s, False, "L0")
    with pytest.raises(BackendError, match="Sq=3 != Sk=6"):
        split_mask(None, b, 3, s, True, "L0")


def test_masks_that_are_derived():
    b, s = 2, 5
    pad = torch.tensor([[True] * 5, [True, True, True, False, False]])
    tri = torch.ones(s, s, dtype=torch.bool).tril()
    k, c = split_mask(pad[:, None, None, :], b, s, s, False, "L")
    assert torch.equal(k, pad) and c is False
    k, c = split_mask(tri[None, None] & pad[:, None, None, :], b, s, s, False, "L")
    assert torch.equal(k, pad) and c is True
    additive = torch.zeros(b, 1, s, s).masked_fill(~(tri & pad[:, None, :])[:, None], torch.finfo(torch.float32).min)
    k, c = split_mask(additive, b, s, s, False, "L")
    assert torch.equal(k, pad) and c is True
    assert split_mask(torch.ones(1, 1, 1, s, dtype=torch.bool), b, s, s, False, "L") == (None, False)


def test_unknown_score_function_is_refused():
    class Sigmoid(torch.nn.Module):
        def forward(self, op, q, k, v, mask):
            return torch.sigmoid(q @ k.transpose(-1, -2)) @ v

    conv = rewrite.convert(_on(models.bert()), passes="", example_inputs=_inputs(), progress=False)
    conv.sites[1].score_fn = Sigmoid()
    with pytest.raises(BackendError, match="site encoder.layer.1.attention: score function Sigmoid has no Triton"):
        lower_triton(conv)


def test_clipped_softmax_that_disagrees_is_refused():
    class Clipped(torch.nn.Module):  # zeta/gamma by duck typing, but a different function (no scale)
        zeta, gamma = 1.0, 0.0

        def forward(self, op, q, k, v, mask):
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    conv = rewrite.convert(_on(models.bert()), passes="", example_inputs=_inputs(), progress=False)
    conv.sites[0].score_fn = Clipped()
    with pytest.raises(BackendError, match="Triton clipped kernel differs from the site's Clipped"):
        lower_triton(conv)


def test_site_wrapper_keeps_the_op():
    conv = rewrite.convert(_on(models.bert()), passes="", example_inputs=_inputs(), progress=False)
    site = TritonSite(conv.sites[0])
    assert site.op is conv.sites[0] and site.kind == "softmax"
