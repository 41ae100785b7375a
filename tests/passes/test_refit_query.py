"""refit-query: per query head a RoPE-commuting map folded into W_q, fitted to the original site's attention rows.

Exact where the site already reproduces the original (an exact re-expression that rotates and re-orders the
heads), the stats equal the second-order row KL measured directly on the calibration inputs (so the normal
equations, the fold into W_q and its commuting with RoPE agree, on rotate_half and interleaved layouts), lower
logit error at another batch and length after a lossy merge, the sites it must skip named, and its refusals."""

import pytest
import torch

import models as M
import rewrite
from rewrite import families as fam
from rewrite.api import restage
from rewrite.calibrate import record_site_inputs
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites
from rewrite.align import apply_head_maps, key_pairing, permute_heads
from rewrite.graph import with_sites
from rewrite.heads import rebuild
from rewrite.pass_base import PassContext
from rewrite.passes.refit_query import RefitQuery
from test_refit_output import _calibration, _llama  # a 2-layer LLaMA of 4 heads, 3 calibration batches
from test_rope_layouts import _rotations
from rewrite.importance import attention_probs
from rewrite.passes.refit_query import head_correspondence


def _logits(op, args):
    x, kv, _, *side = args
    with torch.no_grad():
        q, k, _ = op.project_qkv(x, kv, *side)
        return (q @ op._expand(k, op.k_map, op._k_group).transpose(-1, -2)).double() * op.scale


def _row_kl(op, base, args, match):
    """½ Σ p (δ − δ̄)² summed over the rows of ``args``, query head h of ``op`` against ``match[h]`` of ``base``."""
    p = attention_probs(base, args).double()[:, match]
    d = (_logits(op, args) - _logits(base, args)[:, match]).masked_fill(p == 0, 0)
    d = d - (p * d).sum(-1, keepdim=True)
    return float((p * d * d).sum() / 2), int((p.sum(-1) > 0).sum())


def test_an_exact_rewrite_keeps_its_queries():
    model, base = _llama()
    ops = base.sites
    turned = {}
    for i, op in enumerate(ops):  # every K head turned by a RoPE-commuting rotation (queries by its inverse), then
        t = _rotations(key_pairing(op), op.k_heads, seed=i)  # the heads re-ordered: exact, but new weights
        turned[i] = permute_heads(apply_head_maps(op, t), list(reversed(range(op.k_heads))))
    gm = with_sites(base.gm, turned)
    ctx = PassContext(calibration=[base.bind((), b) for b in _calibration()], captured=base._captured)
    result = RefitQuery(ridge=1e-9).run(gm, ctx)
    assert len(result.stats) == 2
    assert all(s["row_kl_before"] < 1e-10 and s["row_kl_after"] < 1e-10 for s in result.stats.values())
    for op, before in zip(sites(result.graph), turned.values()):
        assert torch.allclose(op.wq, before.wq, atol=1e-5 * float(before.wq.detach().abs().max()))
    x = M.ids(3, 13, seed=9)  # another batch size and length than traced and calibrated
    with torch.no_grad():
        want, got = model(input_ids=x).logits, M.first_tensor(result.graph(input_ids=x, **base.fixed))
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gptj"])  # rotate_half; interleaved with a pass-through part
def test_the_stats_are_the_row_kl_measured_on_the_folded_weights(family):
    if family == "llama":
        model, base = _llama()
        calib = _calibration()
    else:
        model, _ = fam.tiny_model(family)
        base = rewrite.convert(model, "", example_inputs=fam.make_inputs(model, 2, 8), progress=False, verify=False)
        calib = [fam.make_inputs(model, 2, 16, seed=s) for s in (1, 2)]
    spec = "gqa{kv_heads=1,method=mean}"
    merged = restage(base, spec, calib)
    conv = restage(base, spec + ",refit-query{ridge=1e-9}", calib)
    stats = conv.report.stages[-1].stats
    recs = record_site_inputs(merged.gm, lambda kw: merged.gm(**kw, **base.fixed), calib)
    for op_m, op_r, orig, site_recs in zip(merged.sites, conv.sites, base.sites, recs):
        match = head_correspondence(op_m, orig)  # the refitted heads keep the merged heads' order
        kl = [[_row_kl(op, orig, rec.args, match) for rec in site_recs] for op in (op_m, op_r)]
        n = sum(m for _, m in kl[0]) * op_r.q_heads
        b, a = (sum(v for v, _ in k) / n for k in kl)
        s = stats[op_r.info.name]
        assert s["row_kl_before"] == pytest.approx(b, rel=1e-4)
        assert s["row_kl_after"] == pytest.approx(a, rel=1e-3)
        assert a < 0.95 * b  # random weights: a small gain; held-out text of demo-lm: tests/test_reference_lm.py


def test_skips_are_named_and_refusals_name_the_fix():
    model, base = _llama()
    conv = restage(base, "refit-query", _calibration())
    assert conv.report.stages[-1].stats == {}
    assert all("unchanged by the pipeline" in d for d in conv.report.stages[-1].diagnostics)
    lit = restage(base, "lit,refit-query", _calibration())
    assert all("score function (linear attention)" in d for d in lit.report.stages[-1].diagnostics)
    mla = restage(base, "mla{kv_rank=32},refit-query", _calibration())
    assert all("latent (mla) site" in d for d in mla.report.stages[-1].diagnostics)
    with pytest.raises(PassError, match=r"pass 'refit-query' needs calibration data; pass calibration="):
        restage(base, "gqa{kv_heads=1},refit-query")
    with pytest.raises(SpecError, match=r"refit-query\{ridge=0.0\}: ridge must be > 0"):
        rewrite.parse_pipeline("refit-query{ridge=0}")


def test_query_heads_are_matched_through_the_rotation_invariant_gram():
    _, base = _llama()
    aligned = restage(base, "gqa{kv_heads=2,method=aligned}", _calibration())  # rotated and re-ordered heads
    for op, orig in zip(aligned.sites, base.sites):
        match = head_correspondence(op, orig)
        assert match is not None and sorted(match.tolist()) == list(range(orig.q_heads))
        w0, w1 = orig.wq[match].double(), op.wq.double()
        assert torch.allclose(w0.transpose(1, 2) @ w0, w1.transpose(1, 2) @ w1, atol=1e-5)
    op = base.sites[0]
    mixed = rebuild(op, wq=torch.einsum("hg,gdi->hdi", torch.eye(op.q_heads) + 0.1, op.wq))  # heads mixed
    assert head_correspondence(mixed, op) is None
