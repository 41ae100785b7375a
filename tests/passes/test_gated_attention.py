"""gated-attention: exact at identity init on the whole support matrix; gate values per head and token
in both layouts; lossy inits finite; error on the real MiniLM measured; refusals."""
import pytest
import torch

import models as M
from models import rel_err, restage
import rewrite
from rewrite.errors import SpecError
from rewrite.graph import sites
from rewrite.heads import select_query_heads
from rewrite.pass_base import PassContext
from rewrite.scores import SigmoidHeadGate
from test_roundtrip import CASES

TOL = 1e-5
MATRIX = M.support_matrix()


def converted(name):
    return M.converted_case(name, "gated-attention")


@pytest.mark.parametrize("name", MATRIX)
def test_identity_init_is_exact_at_other_shapes_with_padding(name):
    model, conv = converted(name)
    stages = conv.report.to_json()["stages"]
    n_sites = CASES[name][2]
    assert stages[-1]["exact"] and stages[-1]["sites_changed"] == n_sites
    assert stages[-1]["q_heads"] == stages[0]["q_heads"] and stages[-1]["kv_heads"] == stages[0]["kv_heads"]
    # per site: Hq weight vectors of D/Hq plus Hq biases = D + Hq = 64 + 4
    assert stages[-1]["params"] - stages[0]["params"] == n_sites * (64 + 4)
    assert all(isinstance(op.head_gate, SigmoidHeadGate) for op in conv.sites)
    for pad, err in M.padded_errors(name, model, conv).items():
        assert err <= TOL, (name, pad, err)


@pytest.mark.parametrize("name", MATRIX)
def test_lossy_inits_run_finite_and_grow_params_exactly(name):
    model, conv = converted(name)
    inputs = M.case_inputs(name, 3, 13, True)
    for spec, per_site in (("gated-attention{init=normal,std=0.05}", 64 + 4),
                           ("gated-attention{init=normal,all_features=true}", 64 * 4 + 4)):
        lossy, result = restage(conv, spec)
        assert not result.diagnostics and all(st["gate_params"] == per_site for st in result.stats.values())
        assert M.added_params(conv, lossy) == per_site * len(lossy.sites)
        err, out = rel_err(model, lossy, inputs)
        assert torch.isfinite(out).all() and 0 < err < 0.5, (spec, err)


@pytest.mark.parametrize("layout", ["BSD", "SBD"])
def test_gate_is_sigmoid_of_each_heads_slice_of_x_per_token(layout):
    model, conv = converted("multihead-attention" if layout == "SBD" else "bert")
    op = conv.sites[0]
    gate = SigmoidHeadGate(4, 64, std=0.3, seed=1)
    x = torch.randn(7, 3, 64) if layout == "SBD" else torch.randn(3, 7, 64)  # (S,B,D) or (B,S,D)
    g = gate(op, x)
    assert g.shape == (3, 4, 7)  # (B, Hq, S)
    b, h, s = 2, 3, 5
    token = x[s, b] if layout == "SBD" else x[b, s]
    want = torch.sigmoid(token[16 * h:16 * (h + 1)] @ gate.weight[h] + gate.bias[h]) * 2
    assert torch.allclose(g[b, h, s], want)


def test_gradients_reach_the_gate_and_the_gate_changes_the_output():
    model, conv = converted("llama-gqa")
    x = M.ids(2, 8)
    out = conv(input_ids=x, attention_mask=torch.ones(2, 8, dtype=torch.long)).logits
    out.square().mean().backward()
    gate = conv.sites[0].head_gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_minilm_error_is_measured():
    from rewrite.models import sentences

    batch = M.minilm_tokenizer(24)(sentences()[:8])
    conv = rewrite.convert(M.minilm(), passes="gated-attention{init=normal}", example_inputs=batch,
                           progress=False)
    stage = conv.report.to_json()["stages"][-1]
    assert not stage["exact"] and stage["sites_changed"] == 6
    assert stage["params"] - conv.report.stages[0].params == 6 * (384 + 12)
    # N(0, 1e-3) weights: gates ≈ 1 (measured on 16 sentences × 32 tokens: max abs err 0.055, cosine 1.0000)
    assert 0 < stage["max_abs_err"] < 0.2 and stage["cosine"] > 0.9999


def test_width_not_divisible_by_heads_is_skipped_unless_all_features():
    _, conv = converted("bert")
    op = select_query_heads(sites(conv._captured.gm)[0], [0, 1, 2])  # D = 64, 3 query heads
    (p,) = rewrite.parse_pipeline("gated-attention")
    new, _, diags = p.rewrite_site(0, op, PassContext())
    assert new is None and "not divisible by 3 query heads" in str(diags[0]) and "all_features" in str(diags[0])
    (p,) = rewrite.parse_pipeline("gated-attention{all_features=true}")
    new, stats, diags = p.rewrite_site(0, op, PassContext())
    assert not diags and stats["gate_params"] == 3 * 64 + 3
    x = torch.randn(2, 5, 64)
    assert torch.allclose(new(x), op(x), atol=1e-6)  # identity init is exact here too


def test_shared_weights_stay_shared_after_gating():
    conv = M.nanogpt_converted("masa,gated-attention")
    before, after = conv.report.stages[-2:]
    assert after.exact and after.params - before.params == 2 * (64 + 4)  # only the gates are new
    assert all(op.weights is not None and isinstance(op.head_gate, SigmoidHeadGate) for op in conv.sites)


def test_a_gated_site_is_not_gated_twice():
    _, conv = converted("nanogpt")
    (p,) = rewrite.parse_pipeline("gated-attention")
    result = p.run(conv.gm, PassContext(captured=conv._captured))
    assert not result.changed and "already has a head gate" in str(result.diagnostics[0])


@pytest.mark.parametrize("spec, message", [
    ("gated-attention{init=uniform}", "expected one of identity, normal"),
    ("gated-attention{pi_init=1}", "must lie in \\(0, 1\\)"),
    ("gated-attention{std=-1}", "must be >= 0"),
])
def test_refusals(spec, message):
    with pytest.raises(SpecError, match=message):
        M.nanogpt_converted(spec)


def test_exact_property_and_spec():
    (p,) = rewrite.parse_pipeline("gated-attention{pi_init=0.25}")
    assert p.exact and p.spec() == "gated-attention{pi_init=0.25}"
    (p,) = rewrite.parse_pipeline("gated-attention{init=normal}")
    assert not p.exact
