"""sqa: structure on the support matrix (keep / pool / duplicate), exactness of what must be exact,
refusals, and embedding fidelity on the real MiniLM."""

import pytest
import torch

import models as M
from models import first_tensor, masked
import rewrite
from rewrite.errors import PassError, SpecError
from rewrite.graph import sites, with_sites
from rewrite.heads import rebuild
from rewrite.pass_base import PassContext
from rewrite.pipeline import parse


# family -> (spec, expected kv step)
SPECS = {
    "llama_mha": ("sqa{q_heads=2,kv_heads=2}", "keep"),
    "llama_gqa": ("sqa{q_heads=2,kv_heads=1}", "keep"),
    "qwen2": ("sqa{q_heads=2,kv_heads=2}", "keep"),
    "gpt2": ("sqa{q_heads=2,kv_heads=1}", "pool"),
    "bert": ("sqa{q_heads=2,kv_heads=2}", "keep"),
    "nanogpt": ("sqa{q_heads=4,kv_heads=2}", "pool"),
    "encoder": ("sqa{q_heads=2,kv_heads=1}", "pool"),
}
# family -> (model, inputs, spec, expected kv step)
CASES = {family: (*M.HEAD_FAMILIES[family], *SPECS[family]) for family in SPECS}


@pytest.mark.parametrize("family", sorted(CASES))
def test_structure_and_numerics(family):
    make, inputs, spec, step = CASES[family]
    model = make()
    gm, cap = M.canonical_graph(model, inputs(2, 8))
    p = parse(spec)[0]
    result = p.run(gm, PassContext(captured=cap))
    old, new = sites(gm), sites(result.graph)
    for i, (a, b) in enumerate(zip(old, new)):
        st = result.stats[a.info.name]
        assert st["kv_step"] == step
        assert (b.q_heads, b.kv_heads) == (p.q_heads, p.kv_heads)
        assert b.k_map.tolist() == (torch.arange(p.q_heads) // (p.q_heads // p.kv_heads)).tolist()  # contiguous GQA
        assert torch.equal(b.k_map, b.v_map)
        assert b.attn_flops(8) * a.q_heads == a.attn_flops(8) * p.q_heads  # FLOPs scale by q_heads / H
        assert b.kv_cache_bytes_per_token(4) == p.kv_heads * 2 * 16 * 4
        kept = torch.tensor(st["kept"])
        assert torch.equal(b.wq, a.wq[kept]) and torch.equal(b.wo, a.wo[:, kept])  # W_q rows, W_o columns
        if step == "pool":  # each new KV head is the mean of the old KV heads its query heads read
            g = p.q_heads // p.kv_heads
            for f in range(p.kv_heads):
                read = sorted(set(a.k_map[kept[f * g:(f + 1) * g]].tolist()))
                assert torch.allclose(b.wk[f], a.wk[read].mean(0), atol=1e-7)
                assert torch.allclose(b.wv[f], a.wv[read].mean(0), atol=1e-7)
    assert [op.q_heads for op in old] == [4, 4]  # input graph untouched
    if step == "keep":  # kept heads are untouched: equal to the original with the others masked
        drop = {i: [h for h in range(4) if h not in result.stats[op.info.name]["kept"]] for i, op in enumerate(old)}
        x = inputs(3, 13)
        fixed = cap.fixed
        with torch.no_grad():
            want = first_tensor(masked(model, drop)(*x))
            got = first_tensor(result.graph(**dict(zip(cap.kwargs, x)), **fixed))
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_report_and_duplicate_is_exact():
    """GQA 4/2 -> sqa{4,4} duplicates KV heads (no query head goes): equal to the original; then sqa{2,2}."""
    conv = rewrite.convert(M.llama(2), "sqa{q_heads=4,kv_heads=4},sqa{q_heads=2,kv_heads=2}",
                           example_inputs=(M.ids(),), progress=False)
    before, dup, half = conv.report.to_json()["stages"]
    assert dup["q_heads"] == [4, 4] and dup["kv_heads"] == [4, 4]
    assert dup["kv_cache_bytes_per_token"] == 2 * before["kv_cache_bytes_per_token"]
    assert dup["stats"]["model.layers.0.self_attn"]["kv_step"] == "duplicate"
    assert dup["max_abs_err"] <= 1e-5 and dup["cosine"] > 1 - 1e-9  # convert compared it at two shapes
    assert dup["attn_flops"] == before["attn_flops"]
    assert half["q_heads"] == [2, 2] and half["kv_heads"] == [2, 2]
    assert half["attn_flops"] * 2 == before["attn_flops"]
    assert half["kv_cache_bytes_per_token"] == dup["kv_cache_bytes_per_token"] // 2
    assert "sqa{q_heads=4,kv_heads=4},sqa{q_heads=2,kv_heads=2}" == conv.report.pipeline


@pytest.fixture(scope="module")
def llama_gqa():
    return M.canonical_graph(M.llama(2), (M.ids(),))


@pytest.mark.parametrize("spec, message", [
    ("sqa{q_heads=3,kv_heads=2}", "q_heads=3 is not divisible by kv_heads=2"),
    ("sqa{q_heads=2,kv_heads=4}", "need 1 <= kv_heads <= q_heads"),
    ("sqa{q_heads=2,kv_heads=-1}", "need 1 <= kv_heads <= q_heads"),
    ("sqa", "give both q_heads=N and kv_heads=M"),
    ("sqa{q_heads=2,kv_heads=1,importance=loud}", "unknown importance 'loud'"),
])
def test_option_refusals(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)


def test_graph_refusals_and_skips(llama_gqa):
    gm, cap = llama_gqa
    with pytest.raises(SpecError, match="q_heads=8 exceeds the 4 query heads of model.layers.0.self_attn"):
        parse("sqa{q_heads=8,kv_heads=4}")[0].run(gm, PassContext(captured=cap))
    with pytest.raises(PassError, match="importance=taylor needs calibration data"):
        parse("sqa{q_heads=2,kv_heads=1,importance=taylor}")[0].run(gm, PassContext(captured=cap))
    uneven = parse("sqa{q_heads=3,kv_heads=3}")[0].run(gm, PassContext(captured=cap))
    assert not uneven.changed and "cannot be duplicated evenly to kv_heads=3" in str(uneven.diagnostics[0])
    op = sites(gm)[0]  # a DHA-like site: K and V grouped differently
    dha = with_sites(gm, {0: rebuild(op, v_map=torch.tensor([1, 1, 0, 0]))})
    res = parse("sqa{q_heads=2,kv_heads=1}")[0].run(dha, PassContext(captured=cap))
    assert [d.level for d in res.diagnostics] == ["skip"] and "grouped differently" in res.diagnostics[0].message
    assert [o.q_heads for o in sites(res.graph)] == [4, 2]


def test_minilm_fidelity():
    """sSQA (12 -> 6/6) and SQA 6/3 on MiniLM: mean cosine of sentence embeddings to the original."""
    from rewrite.models import sentences

    enc, text = M.minilm_tokenizer(32), sentences()
    gm, cap = M.canonical_graph(M.minilm(), enc(text[:2]))
    ctx = PassContext(calibration=[enc(text[i:i + 16]) for i in range(0, 32, 16)], captured=cap)
    fidelity = M.embedding_fidelity(gm, ctx, [enc(text[100:164])])
    magnitude = fidelity("sqa{q_heads=6,kv_heads=6}")
    taylor = fidelity("sqa{q_heads=6,kv_heads=6,importance=taylor}")
    pooled = fidelity("sqa{q_heads=6,kv_heads=3}")  # KV heads also mean-pooled 6 -> 3
    assert 0.65 < magnitude < taylor < 0.999, (magnitude, taylor)
    assert 0.45 < pooled < magnitude, (pooled, magnitude)
