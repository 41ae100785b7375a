"""prune-heads: structure on the support matrix, equality with the head-masked original, refusals, and
Taylor beating random on the real MiniLM."""

import pytest
import torch

import models as M
from models import first_tensor, masked
import rewrite
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites
from rewrite.pass_base import PassContext
from rewrite.pipeline import parse


MATRIX = M.HEAD_FAMILIES
HEADS = {0: (0, 1), 1: (3,)}  # layer 0 loses a whole GQA group


@pytest.mark.parametrize("family", sorted(MATRIX))
def test_heads_structure_and_equal_to_masked_original(family):
    make, inputs = MATRIX[family]
    model = make()
    conv = rewrite.convert(model, "prune-heads{heads={0:0/1;1:3}}", example_inputs=inputs(2, 8), progress=False)
    rep = conv.report.to_json()
    before, after = rep["stages"]
    assert after["q_heads"] == [2, 3] and before["q_heads"] == [4, 4]
    new = conv.sites
    per_head = [op.wq[0].numel() + (op.bq[0].numel() if op.bq is not None else 0) + op.wo[:, 0].numel() for op in new]
    per_kv = [op.wk[0].numel() + op.wv[0].numel() + (2 * op.bk[0].numel() if op.bk is not None else 0) for op in new]
    gqa = before["kv_heads"] == [2, 2]
    # a KV head goes only with its whole query group: MHA loses 2 + 1, GQA (2 groups of 2) loses group 0
    assert after["kv_heads"] == ([1, 2] if gqa else [2, 3])
    dropped_kv = sum(n * (b - a) for n, b, a in zip(per_kv, before["kv_heads"], after["kv_heads"]))
    assert before["params"] - after["params"] == 2 * per_head[0] + per_head[1] + dropped_kv
    gone = sum(b - a for b, a in zip(before["kv_heads"], after["kv_heads"]))
    kv_bytes = after["kv_cache_bytes_per_token"]  # fp32: K and V of head size 16 per KV head
    assert kv_bytes == sum(op.kv_cache_bytes_per_token(4) for op in new)
    assert before["kv_cache_bytes_per_token"] - kv_bytes == gone * 2 * 16 * 4
    assert after["attn_flops"] * 8 == before["attn_flops"] * 5  # 5 of 8 heads left
    assert after["stats"][new[0].info.name]["removed"] == [0, 1]
    assert new[0].k_map.tolist() == ([0, 0] if gqa else [0, 1])
    # equal to the original with those heads masked, at a batch/sequence other than the traced one
    x = inputs(3, 13)
    with torch.no_grad():
        want, got = first_tensor(masked(model, HEADS)(*x)), first_tensor(conv(*x))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture(scope="module")
def llama_graph():
    """LLaMA with 4 heads per layer, captured once; head 2 of layer 0 zeroed in o_proj (a dead head)."""
    gm, cap = M.canonical_graph(masked(M.llama(4), {0: (2,)}), (M.ids(),))
    ctx = PassContext(calibration=[{"input_ids": M.ids(2, 8, seed=s)} for s in range(2)], captured=cap)
    return gm, ctx


def _run(spec, gm, ctx):
    return parse(spec)[0].run(gm, ctx)


def test_ratio_global_and_layer_scopes_keep_one_head(llama_graph):
    gm, ctx = llama_graph
    assert sum(op.q_heads for op in sites(_run("prune-heads{ratio=0.5,importance=magnitude}", gm, ctx).graph)) == 4
    layer = _run("prune-heads{ratio=0.5,importance=taylor,scope=layer}", gm, ctx)
    assert [op.q_heads for op in sites(layer.graph)] == [2, 2]
    most = _run("prune-heads{ratio=0.9,importance=random,seed=3}", gm, ctx)
    assert [op.q_heads for op in sites(most.graph)] == [1, 1]
    assert any("never removes the last head" in str(d) for d in most.diagnostics)
    assert [op.q_heads for op in sites(gm)] == [4, 4]  # the input graph is untouched


@pytest.mark.parametrize("method", ["taylor", "magnitude", "entropy"])
def test_a_dead_head_goesfirst_tensor(llama_graph, method):
    gm, ctx = llama_graph
    result = _run(f"prune-heads{{ratio=0.125,importance={method}}}", gm, ctx)
    if method == "entropy":  # entropy does not look at W_o: it only has to run and remove one head
        assert sum(len(s["removed"]) for s in result.stats.values()) == 1
    else:
        assert result.stats["model.layers.0.self_attn"]["removed"] == [2]


def test_spec_round_trip():
    p = parse("prune-heads{heads={0:1/2;3:0}}")[0]
    assert p.heads == {0: (1, 2), 3: (0,)}
    assert parse(p.spec())[0] == p


@pytest.mark.parametrize("spec, message", [
    ("prune-heads{ratio=1.5}", r"ratio=1.5 must be in \[0, 1\)"),
    ("prune-heads{ratio=-0.1}", r"ratio=-0.1 must be in \[0, 1\)"),
    ("prune-heads{ratio=0.25,importance=fisher}", "unknown importance 'fisher'"),
    ("prune-heads", "exactly one of ratio"),
    ("prune-heads{ratio=0.25,heads={0:1}}", "exactly one of ratio"),
    ("prune-heads{ratio=0.25,scope=model}", "unknown scope"),
    ("prune-heads{heads={0:a}}", r"prune-heads\{heads\}: expected integer layers and heads as layer:h1/h2"),
])
def test_option_refusals(spec, message):
    with pytest.raises(SpecError, match=message):
        rewrite.convert(M.llama(4), spec, example_inputs=(M.ids(),), progress=False)


@pytest.mark.parametrize("spec, error, message", [
    ("prune-heads{heads={0:0/1/2/3}}", SpecError, "cannot remove all 4 heads of model.layers.0.self_attn"),
    ("prune-heads{heads={5:1}}", SpecError, "names layer 5, but the model has 2 attention sites"),
    ("prune-heads{heads={0:7}}", SpecError, "has 4 heads; no head"),
    ("prune-heads{ratio=0.25}", PassError, "importance=taylor needs calibration data.*importance=magnitude"),
    ("prune-heads{ratio=0.25,importance=entropy}", PassError, "importance=entropy needs calibration data"),
    ("prune-heads{ratio=0.25,importance=taylor-local}", PassError, "importance=taylor-local needs calibration data"),
])
def test_graph_refusals(llama_graph, spec, error, message):
    gm, _ = llama_graph
    with pytest.raises(error, match=message):
        _run(spec, gm, PassContext())


# ---- the real model ------------------------------------------------------------------------------
def test_minilm_taylor_beats_random():
    """25% of MiniLM's heads: Taylor importance keeps the sentence embeddings closer than random; the streamable
    taylor-local (each site's own output) stays near it."""
    from rewrite.models import sentences

    enc, text = M.minilm_tokenizer(32), sentences()
    gm, cap = M.canonical_graph(M.minilm(), enc(text[:2]))
    calib = [enc(text[i:i + 16]) for i in range(0, 32, 16)]
    held_out = sorted(text[100:300], key=len)  # 200 sentences, disjoint from the calibration
    batches = [enc(held_out[i:i + 100]) for i in range(0, 200, 100)]
    fidelity = M.embedding_fidelity(gm, PassContext(calibration=calib, captured=cap), batches)
    taylor = fidelity("prune-heads{ratio=0.25,importance=taylor}")
    rand = sum(fidelity(f"prune-heads{{ratio=0.25,importance=random,seed={s}}}") for s in range(3)) / 3
    local = fidelity("prune-heads{ratio=0.25,importance=taylor-local}")
    assert taylor > rand + 0.03, (taylor, rand)
    assert taylor > 0.9
    assert local > rand + 0.03 and abs(local - taylor) < 0.03, (local, taylor, rand)


@pytest.mark.parametrize("all_features", [False, True])
def test_pruning_after_a_sigmoid_gate_slices_the_gate(all_features, tmp_path):
    """gated-attention, then prune-heads: the gate keeps the kept heads' rows and their slices of x, so the
    result equals the gated model with the pruned head's W_o columns zeroed (at another batch/seq)."""
    from rewrite.graph import with_sites
    from rewrite.heads import rebuild

    inputs = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gated = rewrite.convert(M.llama(4), passes=f"gated-attention{{init=normal,std=0.3,all_features={all_features}}}",
                            example_inputs=inputs, progress=False)
    (prune,) = parse("prune-heads{heads={0:1}}")
    pruned = prune.run(gated.gm, PassContext(captured=gated._captured)).graph
    op = sites(pruned)[0]
    assert op.q_heads == 3 and op.head_gate.weight.shape[0] == 3
    assert op.head_gate.slices is None if all_features else op.head_gate.slices.tolist() == [0, 2, 3]
    ref_op = sites(gated.gm)[0]
    wo = ref_op.wo.detach().clone()
    wo[:, 1] = 0
    reference = with_sites(gated.gm, {0: rebuild(ref_op, wo=wo)})
    x = {"input_ids": M.ids(3, 13, seed=4), "attention_mask": torch.ones(3, 13, dtype=torch.long)}
    with torch.no_grad():
        want = first_tensor(reference(**x, **gated.fixed))
        got = first_tensor(pruned(**x, **gated.fixed))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got - first_tensor(gated(**x))).abs().max() > 1e-3  # the head mattered
    if not all_features:  # the sliced per-head gate exports (all_features keeps whole rows: nothing new)
        from rewrite.api import Converted
        info = Converted(pruned, gated._captured, gated.report).export_onnx(str(tmp_path / "p.onnx"))
        assert info["max_abs_err"] <= 1e-4


def test_head_count_change_after_moh_is_refused():
    inputs = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(PassError, match="cannot follow this change of heads; run head-count passes before moh"):
        rewrite.convert(M.llama(4), passes="moh,prune-heads{heads={0:1}}", example_inputs=inputs, progress=False)
