"""Attention sinks (gpt-oss, MiMo-V2-Flash, Granite-SWA): a learned logit per head joining every softmax row, exact through
capture, head-count passes, generation, ONNX and the stock folder; refused where a backend has no form for it."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models as M
import rewrite
from rewrite import families as fam
from rewrite.errors import BackendError, NoAttentionError
from rewrite.graph import with_sites
from rewrite.heads import select_query_heads

TOL = 1e-5


def sinky(family: str, layers: int = 2):
    """The family's tiny model with sinks large enough to matter (|σ| ~ 2, where a row's mass is ~S) and a
    sliding window shorter than the test sequences."""
    cfg = fam.tiny_config(family)
    cfg.num_hidden_layers = layers
    cfg.layer_types = cfg.layer_types[:layers]
    cfg.sliding_window = 6
    torch.manual_seed(0)
    model = fam.model_class(family)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape) * 2 + 1)
    return model


@pytest.fixture(scope="module")
def gpt_oss():
    model = sinky("gpt_oss")
    return model, rewrite.convert(model, passes=[], example_inputs=fam.make_inputs(model, 2, 8), progress=False)


@pytest.mark.parametrize("family", ["gpt_oss", "mimo_v2_flash", "granite_swa"])  # granite: sigmoid(lse − σ) after
def test_round_trip_is_exact_with_the_sinks_on_the_op(family, gpt_oss):
    model, conv = gpt_oss if family == "gpt_oss" else (sinky(family), None)
    conv = conv or rewrite.convert(model, passes=[], example_inputs=fam.make_inputs(model, 2, 8), progress=False)
    assert conv.report.refusals == [] and len(conv.sites) == 2
    stored = {n: p for n, p in model.named_parameters() if n.endswith("sinks")}
    with_sinks = [op for op in conv.sites if op.sink_logits is not None]
    assert len(with_sinks) == len(stored) >= 1
    for op in with_sinks:
        assert torch.equal(op.sink_logits.detach(), stored[op.info.name + ".sinks"].detach())
        assert op.info.sources["sink_logits"][0] == op.info.name + ".sinks"
    for pad in (False, True):
        assert fam.rel_err(model, conv, fam.make_inputs(model, 3, 13, pad=pad, seed=1)) <= TOL
    if family == "gpt_oss":  # the sinks matter: without them the output is far off
        gm = with_sites(conv.gm, {0: _without_sinks(conv.sites[0])})
        inputs = fam.make_inputs(model, 3, 13, seed=1)
        with torch.no_grad():
            want, got = fam._first(model(**inputs, **fam.no_cache(model))), fam._first(gm(**inputs, **conv.fixed))
        assert float((got - want).abs().max()) > 1e-3


def _without_sinks(op):
    from rewrite.heads import rebuild

    new = rebuild(op)
    new.sink_logits = None
    return new


def _prompt():
    return M.left_padded_prompt(9, 3)


def test_generate_equals_transformers(gpt_oss):
    model, conv = gpt_oss
    ids, mask = _prompt()
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(conv.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_pruned_heads_keep_their_own_sinks(gpt_oss):
    """Pruning query heads slices the sinks with them: equal to the original with those heads' W_o zeroed."""
    model, conv = gpt_oss
    op = conv.sites[0]
    pruned = select_query_heads(op, [1, 3])
    assert torch.equal(pruned.sink_logits.detach(), op.sink_logits.detach()[[1, 3]])
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for h in (0, 2):
            ref.model.layers[0].self_attn.o_proj.weight[:, h * op.head_dim:(h + 1) * op.head_dim] = 0
    inputs = fam.make_inputs(model, 3, 13, pad=True, seed=1)
    with torch.no_grad():
        want = fam._first(ref(**inputs, **fam.no_cache(ref)))
        got = fam._first(with_sites(conv.gm, {0: pruned})(**inputs, **conv.fixed))
    assert float((got - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))
    from rewrite.heads import rebuild

    with pytest.raises(ValueError, match="attention sinks hold one logit per query head and this change of query "
                                         "heads does not say which the new heads read"):
        rebuild(op, wq=op.wq[:2], wo=op.wo[:, :2])


def test_gqa_saves_a_stock_folder_with_the_sinks(gpt_oss, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = gpt_oss
    conv = rewrite.convert(model, passes=["gqa{kv_heads=1}"], example_inputs=fam.make_inputs(model, 2, 8),
                           progress=False)
    info = conv.save_pretrained(str(tmp_path / "out"))
    assert info["kind"] == "stock"
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert again.config.num_key_value_heads == 1
    for name, p in model.named_parameters():
        if name.endswith("sinks"):
            assert torch.equal(again.get_parameter(name), p)
    inputs = fam.make_inputs(model, 2, 11, pad=True, seed=2)
    with torch.no_grad():
        want, got = fam._first(conv(**inputs)), fam._first(again(**inputs, **fam.no_cache(again)))
    assert float((got - want).abs().max()) <= 1e-4


def test_onnx_export_matches_onnxruntime(tmp_path):
    """The sink is one more key with score σ_h and value 0: a standard ONNX ``Attention`` node still."""
    model = sinky("gpt_oss", layers=1)
    conv = rewrite.convert(model, passes=["gqa{kv_heads=1}"], example_inputs=fam.make_inputs(model, 2, 8),
                           progress=False)
    assert conv.sites[0].sink_logits is not None
    info = conv.export_onnx(str(tmp_path / "m.onnx"))
    assert info["attention_nodes"] == 1 and info["max_abs_err"] <= 1e-4


class WithSinks(nn.Module):
    """softmax([q·kᵀ/√d, σ_h])[..., :-1] · v; ``from_input``: the sink logit is computed from x, per row
    ("rows") or as one scalar ("scalar"): both refused."""

    def __init__(self, from_input: str = "", heads: int = 4, dim: int = 32):
        super().__init__()
        self.h, self.dh, self.from_input = heads, dim // heads, from_input
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(heads) * 2)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t(x).view(b, s, self.h, self.dh).transpose(1, 2) for t in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        sink = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, 1)
        if self.from_input == "rows":
            sink = sink + x.mean(-1).reshape(b, 1, s, 1)
        elif self.from_input == "scalar":
            sink = sink * (1 + x.mean())
        p = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        return self.o((p @ v).transpose(1, 2).reshape(b, s, -1))


def _x(b, s, seed=0):
    return torch.randn(b, s, 32, generator=torch.Generator().manual_seed(seed))


def test_a_module_with_sinks_round_trips_and_triton_and_lit_say_what_they_do():
    torch.manual_seed(0)
    model = WithSinks().eval()
    conv = rewrite.convert(model, passes=[], example_inputs=(_x(2, 8),), progress=False)
    with torch.no_grad():
        assert torch.allclose(conv(_x(3, 11, 1)), model(_x(3, 11, 1)), rtol=TOL, atol=TOL)
    assert str(rewrite.inspect(model, (_x(2, 8),))).endswith("attention sinks (4 per-head logits)")
    from rewrite.backends.triton.lowering import site_kind

    with pytest.raises(BackendError, match=r"attention sinks \(a learned logit per head in every softmax row\) are "
                                           "not in the Triton kernels"):
        site_kind(conv.sites[0])
    lit = rewrite.convert(model, passes=["lit"], example_inputs=(_x(2, 8),), progress=False, verify=False)
    assert lit.sites[0].sink_logits is None
    assert any("attention sinks (a logit per head in every softmax row) have no counterpart in linear attention"
               in d for d in lit.report.stages[-1].diagnostics)


@pytest.mark.parametrize("source,message", [
    ("rows", r"attention sinks that differ between rows or batch entries \(not one logit per head\)"),
    ("scalar", r"attention sinks computed from '\w+' \(only a stored logit per head is supported\)")])
def test_sinks_computed_from_the_input_are_refused_by_name(source, message):
    with pytest.raises(NoAttentionError, match=message):
        rewrite.convert(WithSinks(from_input=source).eval(), passes=[], example_inputs=(_x(2, 8),), progress=False)
