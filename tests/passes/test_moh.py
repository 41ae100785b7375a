"""moh: exact at active_ratio=1 on the whole support matrix; gates, top-K and the q-norm router checked
against hand computations; load-balance loss; active-head fractions on calibration data (real MiniLM);
refusals."""
import pytest
import torch

import models as M
from models import rel_err, restage
import rewrite
from rewrite.errors import SpecError
from rewrite.graph import sites
from rewrite.heads import select_query_heads
from rewrite.pass_base import PassContext
from rewrite.passes.moh import head_split, load_balance_loss
from rewrite.scores import MoHGate
from test_roundtrip import CASES

TOL = 1e-5
MATRIX = M.support_matrix()


def converted(name):
    return M.converted_case(name, "moh{active_ratio=1}")


@pytest.mark.parametrize("name", MATRIX)
def test_all_heads_active_is_exact_at_other_shapes_with_padding(name):
    model, conv = converted(name)
    stages = conv.report.to_json()["stages"]
    n_sites = CASES[name][2]
    assert stages[-1]["exact"] and stages[-1]["sites_changed"] == n_sites
    assert stages[-1]["kv_heads"] == stages[0]["kv_heads"]  # the KV cache is unchanged
    # 4 heads, shared_ratio 0.5: W_s [2, 64], W_r [2, 64], W_h [2, 64]
    assert stages[-1]["params"] - stages[0]["params"] == n_sites * 3 * 2 * 64
    for pad, err in M.padded_errors(name, model, conv).items():
        assert err <= TOL, (name, pad, err)


@pytest.mark.parametrize("name", MATRIX)
def test_partial_routing_runs_finite_for_both_routers(name):
    model, conv = converted(name)
    inputs = M.case_inputs(name, 3, 13, True)
    for spec, per_site in (("moh{active_ratio=0.5,shared_ratio=0.25}", (3 + 2) * 64),
                           ("moh{router=qnorm}", 0)):
        sparse, result = restage(conv, spec)
        assert not result.diagnostics and all(st["router_params"] == per_site for st in result.stats.values())
        assert M.added_params(conv, sparse) == per_site * len(sparse.sites)
        err, out = rel_err(model, sparse, inputs)
        assert torch.isfinite(out).all() and err > 0


def test_qnorm_router_exact_at_ratio_one():
    model, _ = converted("qwen3-qk-norm")
    conv = rewrite.convert(model, passes="moh{active_ratio=1,router=qnorm}",
                           example_inputs=M.case_inputs("qwen3-qk-norm", 2, 8), progress=False)
    assert conv.report.stages[-1].exact and conv.report.stages[-1].params == conv.report.stages[0].params
    assert rel_err(model, conv, M.case_inputs("qwen3-qk-norm", 3, 13, True))[0] <= TOL


@pytest.mark.parametrize("layout", ["BSD", "SBD"])
def test_qnorm_mask_is_top_k_of_std_normalised_query_norms(layout):
    _, conv = converted("multihead-attention" if layout == "SBD" else "llama-gqa")
    op = sites(conv._captured.gm)[0]
    op_wide = select_query_heads(op, [0, 1, 2, 3, 0, 1, 2, 3])  # 8 heads: 4 shared, 4 routed, K = 2
    gate = MoHGate(8, 64, shared=4, top_k=2, router="qnorm")
    x = torch.randn(6, 3, 64) if layout == "SBD" else torch.randn(3, 6, 64)
    g = gate(op_wide, x)  # (B, Hq, S)
    assert g.shape == (3, 8, 6) and set(g.unique().tolist()) == {0.0, 1.0}
    assert (g[:, :4] == 1).all() and (g[:, 4:].sum(1) == 2).all()
    b, s = 1, 4
    token = x[s, b] if layout == "SBD" else x[b, s]
    q = torch.einsum("hdk,k->hd", op_wide.wq, token) + (op_wide.bq if op_wide.bq is not None else 0)
    norms = q[4:].norm(dim=-1)
    probs = torch.softmax(norms / norms.std(), dim=0)
    assert set(torch.topk(probs, 2).indices.tolist()) == set((g[b, 4:, s] == 1).nonzero().flatten().tolist())


def test_learned_gates_follow_the_official_rescalings():
    gate = MoHGate(6, 8, shared=2, top_k=2, router="learned")
    torch.manual_seed(0)
    for w in (gate.w_shared, gate.w_routed, gate.w_type):
        torch.nn.init.normal_(w)
    op = type("Op", (), {"info": type("I", (), {"layout": "BSD"})()})()
    x = torch.randn(1, 1, 8)
    g = gate(op, x)[0, :, 0]
    alpha = torch.softmax(gate.w_type @ x[0, 0], 0) * 2
    shared = torch.softmax(gate.w_shared @ x[0, 0], 0) * 2 * alpha[0]
    p = torch.softmax(gate.w_routed @ x[0, 0], 0)
    top = torch.topk(p, 2).indices
    routed = torch.zeros(4).index_put((top,), p[top] / p[top].sum() * 2) * alpha[1]
    assert torch.allclose(g, torch.cat([shared, routed]), atol=1e-6)


def test_load_balance_loss_is_E_times_sum_of_mean_prob_times_frequency_and_has_gradients():
    model, conv = converted("llama-gqa")
    sparse, _ = restage(conv, "moh{active_ratio=0.75}")  # 2 shared, 2 routed, K = 1
    out = sparse(input_ids=M.ids(2, 8), attention_mask=torch.ones(2, 8, dtype=torch.long)).logits
    loss = load_balance_loss(sparse)
    # zero router: P̄_i = 1/2, one head always chosen → l_aux = 2·(½·1 + ½·0) = 1 per site
    assert float(loss.detach()) == pytest.approx(2 * 1.0)  # two sites
    (out.square().mean() + 0.01 * loss).backward()
    assert sparse.sites[0].head_gate.w_routed.grad.abs().sum() > 0
    conv(input_ids=M.ids(2, 8), attention_mask=torch.ones(2, 8, dtype=torch.long))
    assert float(load_balance_loss(conv)) == pytest.approx(2 * 2.0)  # ratio 1: l_aux = 2·(½·1 + ½·1) per site


def test_minilm_active_fraction_measured_on_calibration():
    from rewrite.models import sentences

    enc = M.minilm_tokenizer(24)
    model = M.minilm()
    conv = rewrite.convert(model, passes="moh{router=qnorm,active_ratio=0.9}", example_inputs=enc(sentences()[:4]),
                           calibration=[enc(sentences()[200:216])], progress=False)
    stage = conv.report.to_json()["stages"][-1]
    assert not stage["exact"] and stage["params"] == conv.report.stages[0].params
    assert stage["cosine"] > 0.9  # measured: 0.958 (no training)
    for site, st in stage["stats"].items():
        assert (st["shared_heads"], st["top_k"], st["active_heads"]) == (6, 5, 11)  # of 12 heads
        assert st["active_fraction"] == pytest.approx(11 / 12, abs=1e-3)
        assert st["head_frequency"][:6] == [1.0] * 6 and sum(st["head_frequency"][6:]) == pytest.approx(5, abs=1e-3)
        assert st["load_balance_loss"] >= 5 - 1e-3  # E·Σ P̄ f̄ ≥ K, equality when perfectly balanced


def test_head_split_rounding():
    assert head_split(32, 0.75, 0.5) == (16, 8)  # MoH-LLaMA3
    assert head_split(12, 0.9, 0.5) == (6, 5)
    assert head_split(4, 1.0, 0.0) == (0, 4)


def test_derived_shared_ratio_keeps_a_routed_head():
    assert head_split(32, 0.75) == head_split(32, 0.75, 0.5) == (16, 8)  # the default keeps MoH-LLaMA3's split
    assert head_split(12, 0.9) == (6, 5) and head_split(4, 1.0) == (2, 2)
    assert head_split(12, 0.5) == (4, 2)  # shared share ⅔·0.5
    assert head_split(4, 0.25) == (0, 1)  # one active head: routed, not shared
    for h in (1, 2, 3, 4, 12, 32):  # whenever a head is active at all, one of them is routed
        assert all(head_split(h, a)[1] >= 1 for a in (0.25, 0.5, 0.6, 0.75, 0.9, 1.0) if round(a * h) >= 1)


def test_active_ratio_alone_is_accepted_at_any_valid_value():
    model, conv = converted("llama-gqa")
    sparse, result = restage(conv, "moh{active_ratio=0.5}")  # 4 heads: 1 shared, 1 of 3 routed
    assert not result.diagnostics
    assert all((st["shared_heads"], st["top_k"]) == (1, 1) for st in result.stats.values())
    err, out = rel_err(model, sparse, M.case_inputs("llama-gqa", 3, 13, True))
    assert torch.isfinite(out).all() and err > 0
    assert rewrite.parse_pipeline("moh{active_ratio=0.5}")[0].spec() == "moh{active_ratio=0.5}"


def test_site_with_too_few_heads_is_skipped_with_a_reason():
    _, conv = converted("bert")
    op = select_query_heads(sites(conv._captured.gm)[0], [0, 1])  # 2 heads: 1 shared, 1 active
    (p,) = rewrite.parse_pipeline("moh{active_ratio=0.6,shared_ratio=0.5}")
    new, _, diags = p.rewrite_site(0, op, PassContext())
    assert new is None and "leave no routed head active" in str(diags[0])


@pytest.mark.parametrize("spec, message", [
    ("moh{active_ratio=0}", "active_ratio.*must lie in \\(0, 1\\]"),
    ("moh{active_ratio=1.5}", "active_ratio.*must lie in \\(0, 1\\]"),
    ("moh{shared_ratio=-0.1}", "shared_ratio.*must lie in \\[0, 1\\)"),
    ("moh{active_ratio=0.5,shared_ratio=0.5}", "shared_ratio=0.5 must be below active_ratio=0.5"),
    ("moh{shared_ratio=0.8}", "shared_ratio=0.8 must be below active_ratio=0.75"),
    ("moh{router=random}", "expected one of learned, qnorm"),
])
def test_refusals(spec, message):
    with pytest.raises(SpecError, match=message):
        M.nanogpt_converted(spec)
