"""refit-output: W_o refitted per site by ridge least squares to the original site's output on calibration.

Exact where the site already reproduces the original (the exact GQA→MLA form, latent sites included), the
closed-form solution on the site's recorded inputs, lower error at another batch and length after a lossy
merge, the sites it must skip named, and its refusals."""
import functools

import pytest
import torch

import models as M
import rewrite
from rewrite.api import restage
from rewrite.calibrate import record_site_inputs
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites
from rewrite.passes.refit_output import head_outputs
from rewrite.stream_calib import can_stream


def _calibration():
    return [{"input_ids": M.ids(2, 16, seed=s)} for s in (1, 2, 3)]


@functools.lru_cache(maxsize=None)
def _llama():
    torch.manual_seed(0)
    model = M.llama(kv_heads=4)
    return model, rewrite.convert(model, "", example_inputs={"input_ids": M.ids(2, 8)}, progress=False)


def _err(model, conv, seed=9):
    x = M.ids(3, 13, seed=seed)  # another batch size and length than the traced (2, 8) and calibration (2, 16)
    with torch.no_grad():
        want, got = model(input_ids=x).logits, conv(input_ids=x).logits
    return float((got - want).abs().max() / want.abs().max())


def test_an_exact_rewrite_keeps_its_output_projection_also_on_latent_sites():
    model, base = _llama()
    conv = restage(base, "mla,refit-output{ridge=1e-9}", _calibration())  # the exact GQA -> MLA form first
    stats = conv.report.stages[-1].stats
    assert len(stats) == 2 and all(s["rel_err_before"] < 1e-10 and s["rel_err_after"] < 1e-10 for s in stats.values())
    for op, mla in zip(conv.sites, sites(conv._stage_graphs[1])):
        assert torch.allclose(op.wo, mla.wo, atol=1e-3 * float(mla.wo.abs().max()))  # 96 tokens, 64 features
    assert _err(model, conv) <= 1e-5


def test_the_fit_is_the_least_squares_solution_and_lowers_the_error_elsewhere():
    model, base = _llama()
    merged = restage(base, "gqa{kv_heads=1,method=mean}", _calibration())
    conv = restage(base, "gqa{kv_heads=1,method=mean},refit-output{ridge=1e-6}", _calibration())
    op, orig, before = conv.sites[0], base.sites[0], merged.sites[0]
    zz, yz = 0, 0
    for rec in record_site_inputs(merged.gm, lambda kw: merged.gm(**kw, **base.fixed), _calibration())[0]:
        with torch.no_grad():
            y = orig(*rec.args).reshape(-1, 64).double()
        _, z = head_outputs(before, rec.args)
        zz, yz = zz + z.double().T @ z.double(), yz + y.T @ z.double()
    lam = 1e-6 * float(torch.diagonal(zz).mean())  # the ridge pulls toward the W_o there was
    prior = before.wo.detach().double().reshape(yz.shape)
    want = torch.linalg.solve(zz + lam * torch.eye(zz.shape[0], dtype=zz.dtype), (yz + lam * prior).T).T
    assert torch.allclose(op.wo.detach().double().reshape(want.shape), want, atol=1e-4 * float(want.abs().max()))
    site = conv.report.stages[-1].stats[op.info.name]
    assert site["rel_err_after"] < 0.8 * site["rel_err_before"], site
    assert _err(model, conv) < 0.9 * _err(model, merged)  # held out: another batch, length and seed
    assert (op.q_heads, op.kv_heads) == (4, 1) and op.wo.shape == before.wo.shape


def test_shared_atoms_linear_attention_and_unchanged_sites_are_skipped_by_name():
    _, base = _llama()
    conv = restage(base, "masa{atoms=1},refit-output", _calibration())
    diags = [str(d) for d in conv.report.stages[-1].diagnostics]
    assert any("its W_o comes from shared weights (masa atoms); a refit would unshare them" in d for d in diags)
    conv = restage(base, "lit,refit-output", _calibration())
    assert any("a score function (linear attention): not refitted" in str(d) for d in conv.report.stages[-1].diagnostics)
    conv = restage(base, "refit-output", _calibration())
    assert all("unchanged by the pipeline" in str(d) for d in conv.report.stages[-1].diagnostics)
    assert len(conv.report.stages[-1].diagnostics) == 2
    assert all(a is b for a, b in zip(conv.sites, base.sites))


def test_refusals():
    _, base = _llama()
    with pytest.raises(SpecError, match=r"refit-output\{ridge=0.0\}: ridge must be > 0"):
        rewrite.parse_pipeline("refit-output{ridge=0}")
    with pytest.raises(PassError, match="pass 'refit-output' needs calibration data"):
        restage(base, "gqa{kv_heads=2},refit-output")
    why = can_stream(rewrite.parse_pipeline("gqa{kv_heads=2},refit-output"))
    assert "'refit-output' cannot stream: refit-output reads the captured (original) site" in why, why


def test_the_ridge_is_cross_validated_so_little_calibration_does_not_hurt():
    """72 calibration tokens for a width of 64 (random-weight LLaMA, mean-pooled to one KV head): the fixed small
    ridge fits the few tokens and raises the error on other inputs above the merge alone; the ridge chosen on the
    held-out calibration sequences (or no refit) does not. One calibration sequence: RIDGES' largest."""
    from rewrite.passes.refit_output import RIDGES

    torch.manual_seed(0)
    model, gen = M.llama(), torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 60, (2, 12), generator=gen)} for _ in range(3)]
    test = torch.randint(0, 60, (4, 24), generator=gen)

    def error(spec, calibration=calib):
        conv = rewrite.convert(model, spec, example_inputs=calib[0], calibration=calibration, progress=False)
        with torch.no_grad():
            want, got = model(input_ids=test).logits, conv(input_ids=test).logits
        return float((got - want).norm() / want.norm()), conv.report.stages[-1].stats

    merged, _ = error("gqa{kv_heads=1,method=mean}")
    fixed, _ = error("gqa{kv_heads=1,method=mean},refit-output{ridge=1e-3}")
    chosen, stats = error("gqa{kv_heads=1,method=mean},refit-output")
    print(f"output error: merge {merged:.3f}, refit at 1e-3 {fixed:.3f}, cross-validated {chosen:.3f}")
    assert fixed > 1.03 * merged and chosen < merged, (merged, fixed, chosen)
    for site in stats.values():
        assert set(site["held_out_rel_err"]) == {*RIDGES, "keep"}
        assert site["held_out_rel_err"][site["ridge"]] == min(site["held_out_rel_err"].values())
    _, stats = error("gqa{kv_heads=1,method=mean},refit-output", [{"input_ids": calib[0]["input_ids"][:1]}])
    assert {site["ridge"] for site in stats.values()} == {RIDGES[-1]}
