"""Score modifiers between q·kᵀ and softmax (rewrite/score_mods.py): per-query-head biases (ALiBi, relative
position) that follow the query heads through head-count passes, the tanh soft-cap, and the refusal of
content-dependent terms (DeBERTa's c2p/p2c). Tiny 1-layer models; every family at another batch and length
than traced, with and without padding."""
import copy
import math

import pytest
import torch
from torch import nn

import models as M
import rewrite
from rewrite import families as fam
from rewrite.errors import BackendError, NoAttentionError, SpecError
from rewrite.graph import with_sites
from rewrite.heads import rebuild, select_query_heads
from rewrite.ir import only_causal

TOL = 1e-5


def one_layer(family: str):
    """The family's tiny model with one layer (per stack), seeded weights."""
    cfg = fam.tiny_config(family)
    for name in ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer", "n_layers"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1)
    torch.manual_seed(0)
    return fam.model_class(family)(cfg).eval()


@pytest.fixture(scope="module")
def converted():
    """family -> (model, conv), each converted once at (2, 8)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = one_layer(family)
            cache[family] = model, rewrite.convert(model, passes=[], example_inputs=fam.make_inputs(model, 2, 8),
                                                   progress=False)
        return cache[family]

    return get


def _run(conv, gm, inputs):
    with torch.no_grad():
        return fam._first(gm(**inputs, **conv.fixed)).float()


# ---- round trips ----------------------------------------------------------------------------------------
# (family, what it adds to the scores)
FAMILIES = [("bloom", "alibi"), ("mpt", "alibi"), ("t5", "bias"), ("mpnet", "bias"), ("gemma2", "softcap"),
            ("xglm", None), ("flaubert", None)]


@pytest.mark.parametrize("family,kind", FAMILIES)
def test_round_trip_is_exact(converted, family, kind):
    model, conv = converted(family)
    assert conv.report.refusals == [] and len(conv.sites) >= 1
    op = conv.sites[0]
    if kind in ("alibi", "bias"):  # the mask carries one row per query head
        assert op.bias_map is not None and op.bias_map.tolist() == list(range(op.q_heads))
    if kind == "softcap":
        assert op.softcap == model.config.attn_logit_softcapping
    for pad in (False, True):
        inputs = fam.make_inputs(model, 3, 13, pad=pad, seed=1)
        assert fam.rel_err(model, conv, inputs) <= TOL


# ---- head-count passes keep the bias on the right query heads ---------------------------------------------
def _zero_heads(model, family, heads, dh):
    """A copy of ``model`` whose first attention output projection ignores the ``heads`` (W_o columns zeroed)."""
    ref = copy.deepcopy(model)
    o = {"bloom": lambda m: m.transformer.h[0].self_attention.dense,
         "mpnet": lambda m: m.encoder.layer[0].attention.attn.o}[family](ref)
    with torch.no_grad():
        for h in heads:
            o.weight[:, h * dh:(h + 1) * dh] = 0
    return ref


@pytest.mark.parametrize("family", ["bloom", "mpnet"])  # ALiBi, relative-position bias
def test_prune_heads_keeps_each_heads_bias(converted, family):
    model, conv = converted(family)
    op = conv.sites[0]
    gone = [0, 2]
    pruned = select_query_heads(op, [1, 3])
    assert pruned.q_heads == 2 and pruned.bias_map.tolist() == [1, 3]
    gm = with_sites(conv.gm, {0: pruned})
    inputs = fam.make_inputs(model, 3, 13, pad=True, seed=1)
    ref = _zero_heads(model, family, gone, op.head_dim)
    with torch.no_grad():
        want = fam._first(ref(**inputs, **fam.no_cache(ref))).float()
    got, tol = _run(conv, gm, inputs), TOL * max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tol
    wrong = rebuild(pruned, bias_map=torch.tensor([0, 1]))  # the same heads reading other heads' bias rows
    assert float((_run(conv, with_sites(conv.gm, {0: wrong}), inputs) - want).abs().max()) > 10 * tol


def _prompt():
    return M.left_padded_prompt(6, 2)


def test_prune_heads_pass_slices_the_bias_also_when_decoding(converted):
    """ALiBi depends on absolute positions: with a cache the pruned heads still read their own slopes."""
    model, _ = converted("bloom")
    conv = rewrite.convert(model, passes=["prune-heads{heads={0:0/3}}"], example_inputs=fam.make_inputs(model, 2, 8),
                           progress=False)
    assert conv.sites[0].bias_map.tolist() == [1, 2]
    inputs = fam.make_inputs(model, 3, 13, seed=1)
    ref = _zero_heads(model, "bloom", [0, 3], conv.sites[0].head_dim)
    with torch.no_grad():
        want = fam._first(ref(**inputs, **fam.no_cache(ref))).float()
        assert float((fam._first(conv(**inputs)).float() - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))
        ids, mask = _prompt()
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(conv.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


@pytest.mark.parametrize("family", ["bloom", "mpt", "gemma2"])  # ALiBi, ALiBi, soft-cap
def test_generate_equals_transformers(converted, family):
    model, conv = converted(family)
    ids, mask = _prompt()
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(conv.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_a_change_of_query_heads_must_say_where_the_bias_goes(converted):
    _, conv = converted("bloom")
    op = conv.sites[0]
    with pytest.raises(ValueError, match="score bias has one row per query head"):
        rebuild(op, wq=op.wq[:2], wo=op.wo[:, :2])


class AlibiAttn(nn.Module):
    """Causal GQA self-attention with ALiBi (1, H, S, S) and an optional soft-cap:

        s = c·tanh(q·kᵀ/√d / c) − m_h·(i − j),  future keys hidden,  m_h = 2^(−8h/H).
    """

    def __init__(self, dim=32, heads=4, kv_heads=2, softcap=0.0):
        super().__init__()
        self.h, self.hk, self.dh, self.softcap = heads, kv_heads, dim // heads, softcap
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * self.dh), nn.Linear(dim, kv_heads * self.dh)
        self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads))

    def forward(self, x):
        b, s, _ = x.shape
        g = self.h // self.hk
        q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)  # (B, H, S, d)
        k, v = (t(x).view(b, s, self.hk, self.dh).transpose(1, 2)[:, :, None]
                .expand(b, self.hk, g, s, self.dh).reshape(b, self.h, s, self.dh) for t in (self.k, self.v))
        pos = torch.arange(s, device=x.device, dtype=x.dtype)
        alibi = (self.slopes[:, None, None] * (pos[None, :] - pos[:, None]))[None]  # (1, H, S, S)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = (scores + alibi).masked_fill(torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1),
                                              float("-inf"))
        y = torch.softmax(scores, -1) @ v  # (B, H, S, d)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def _x(b, s, seed=0):
    return torch.randn(b, s, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def alibi():
    torch.manual_seed(0)
    model = AlibiAttn().eval()
    return model, rewrite.convert(model, passes=[], example_inputs=(_x(2, 8),), progress=False)


def test_causal_mask_with_a_bias_is_not_is_causal(alibi):
    model, conv = alibi
    op = conv.sites[0]
    assert op.info.causal_mask and op.bias_map is not None  # causal, and a bias on the visible keys
    s = 6
    causal = torch.zeros(s, s).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    assert only_causal(causal[None, None], s, s)
    assert not only_causal((causal + torch.arange(s, dtype=torch.float))[None, None], s, s)
    x = _x(3, 11, seed=1)
    with torch.no_grad():
        assert torch.allclose(conv(x), model(x), rtol=TOL, atol=TOL)


def test_gqa_duplicate_on_alibi_is_exact(alibi):
    model, _ = alibi
    conv = rewrite.convert(model, passes=["gqa{kv_heads=4}"], example_inputs=(_x(2, 8),), progress=False)
    assert conv.sites[0].k_heads == 4 and conv.sites[0].bias_map.tolist() == [0, 1, 2, 3]
    x = _x(3, 11, seed=1)
    with torch.no_grad():
        assert torch.allclose(conv(x), model(x), rtol=TOL, atol=TOL)


def test_sqa_keeps_the_bias_of_the_heads_it_keeps():
    """sqa (keep case, MHA → 2 query heads): the kept heads compute what they did, with their own ALiBi slopes."""
    torch.manual_seed(0)
    model = AlibiAttn(kv_heads=4).eval()
    conv = rewrite.convert(model, passes=["sqa{q_heads=2,kv_heads=2}"], example_inputs=(_x(2, 8),), progress=False)
    op = conv.sites[0]
    kept = op.bias_map.tolist()
    assert op.q_heads == 2 and len(set(kept)) == 2
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for h in set(range(4)) - set(kept):
            ref.o.weight[:, h * ref.dh:(h + 1) * ref.dh] = 0
        x = _x(3, 11, seed=1)
        assert torch.allclose(conv(x), ref(x), rtol=TOL, atol=TOL)


def test_softcap_round_trip_and_triton_refusal():
    torch.manual_seed(0)
    model = AlibiAttn(softcap=2.0).eval()
    conv = rewrite.convert(model, passes=[], example_inputs=(_x(2, 8),), progress=False)
    assert conv.sites[0].softcap == pytest.approx(2.0)
    x = _x(3, 11, seed=1)
    with torch.no_grad():
        assert torch.allclose(conv(x), model(x), rtol=TOL, atol=TOL)
    assert str(rewrite.inspect(model, (_x(2, 8),))).endswith("per-head score bias (4 of 4 rows), tanh soft-cap c=2")
    from rewrite.backends.triton.lowering import site_kind

    with pytest.raises(BackendError, match=r"site .*: the tanh soft-cap of the scores \(c·tanh\(s/c\), c=2\)"):
        site_kind(conv.sites[0])


def test_onnx_export_of_soft_cap_and_alibi_matches_onnxruntime(tmp_path):
    """One ONNX ``Attention`` node with ``softcap`` and the (gathered) ALiBi rows as its additive mask."""
    torch.manual_seed(0)
    model = AlibiAttn(softcap=2.0).eval()
    conv = rewrite.convert(model, passes=["prune-heads{heads={0:1}}"], example_inputs=(_x(2, 8),), progress=False)
    assert conv.sites[0].bias_map.tolist() == [0, 2, 3]  # a non-identity bias map exports too
    info = conv.export_onnx(str(tmp_path / "m.onnx"))
    assert info["attention_nodes"] == 1 and info["max_abs_err"] <= 1e-4


class ShiftedRows(AlibiAttn):
    """softmax(s − max_j s + 0.5) · v over (B·H, S, S) scores (bmm, as older eager attention code does)."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t(x).view(b, s, self.h, self.dh).transpose(1, 2).reshape(b * self.h, s, self.dh)
                   for t in (self.q, self.k, self.v))  # (B·H, S, d); kv_heads == heads
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.dh)  # (B·H, S, S)
        scores = (scores - scores.amax(-1, keepdim=True) + 0.5).view(b, self.h, s, s)
        y = torch.bmm(torch.softmax(scores, -1).view(b * self.h, s, s), v).view(b, self.h, s, self.dh)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_row_shifts_and_head_views_of_the_scores_are_exact():
    torch.manual_seed(0)
    model = ShiftedRows(kv_heads=4).eval()
    conv = rewrite.convert(model, passes=[], example_inputs=(_x(2, 8),), progress=False)
    assert len(conv.sites) == 1 and conv.report.refusals == []
    x = _x(3, 11, seed=1)
    with torch.no_grad():
        assert torch.allclose(conv(x), model(x), rtol=TOL, atol=TOL)


# ---- refusals ---------------------------------------------------------------------------------------------
def test_deberta_disentangled_attention_is_refused_by_name():
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          vocab_size=64, max_position_embeddings=64, relative_attention=True,
                          pos_att_type=["c2p", "p2c"], position_buckets=8)
    torch.manual_seed(0)
    model = DebertaV2Model(cfg).eval()
    ids = torch.randint(3, 60, (2, 8))
    with pytest.raises(NoAttentionError, match=r"encoder\.layer\.0\.attention\.self: disentangled "
                                               r"content-to-position attention"):
        rewrite.convert(model, passes=[], example_inputs={"input_ids": ids}, progress=False)


def test_lit_says_it_drops_a_soft_cap():
    """Linear attention has no scores to cap: lit converts the site and says the cap is gone."""
    torch.manual_seed(0)
    model = AlibiAttn(softcap=2.0).eval()
    model.slopes.zero_()  # a zero ALiBi: the causal mask alone, which lit takes
    conv = rewrite.convert(model, passes=["lit"], example_inputs=(_x(2, 8),), progress=False, verify=False)
    assert conv.sites[0].score_fn is not None
    assert any("soft-cap 2·tanh(s/2) has no counterpart in linear attention; it is dropped" in d
               for d in conv.report.stages[-1].diagnostics)


def test_a_per_head_value_bias_refuses_a_change_of_value_heads():
    """DeBERTa adds its value bias after the head split: the value transform holds 4 heads' constants, so gqa
    (fewer value heads) must refuse by name instead of broadcasting the bias over the wrong heads."""
    model, _ = fam.tiny_model("deberta")
    example = fam.make_inputs(model, 2, 8)
    conv = rewrite.convert(model, passes=[], example_inputs=example, progress=False)
    assert "per-head constants for 4 heads" in conv.sites[0].v_transform.description
    with pytest.raises(SpecError, match=r"its value transform \(add with per-head constants for 4 heads\) holds "
                                        r"one entry per head"):
        rewrite.convert(model, passes=["gqa{kv_heads=1}"], example_inputs=example, progress=False)
