"""API contract: errors with their messages, no mutation of the caller's model, report keys, save/load."""
import copy

import pytest
import torch
from torch import nn

import models as M
import rewrite
from rewrite.errors import CaptureError, NoAttentionError, PassError, SpecError
from rewrite.pipeline import parse


def _inputs(b=2, s=8):
    return {"input_ids": M.ids(b, s), "attention_mask": torch.ones(b, s, dtype=torch.long)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.branch = Branchy()

    def forward(self, x):
        return self.branch(self.inner(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent Python control flow
            return x * 2
        return x.nonzero()


def test_model_without_attention_is_refused():
    with pytest.raises(NoAttentionError, match="no attention found in the model"):
        rewrite.convert(MLP(), passes=[], example_inputs=(torch.randn(2, 5, 16),), progress=False)


def test_untraceable_model_names_the_module():
    with pytest.raises(CaptureError, match="tracing broke in module 'branch'"):
        rewrite.convert(Untraceable(), passes=[], example_inputs=(torch.ones(2, 3, 4),), progress=False)


def test_unknown_pass_lists_valid_names():
    with pytest.raises(SpecError, match=r"unknown pass 'gqaa'; valid passes: .*"):
        parse("gqaa{kv_heads=2}")


def test_unknown_option_lists_valid_options():
    name = sorted(rewrite.pipeline.available())[0]
    with pytest.raises(SpecError, match=f"unknown option 'bogus' for pass '{name}'; valid options:"):
        parse(f"{name}{{bogus=1}}")


@pytest.mark.parametrize("spec, message", [
    ("x{", "unbalanced"), ("a}", "unbalanced"), ("9abc", "cannot parse"),
])
def test_malformed_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)


SPECS = ["gqa{kv_heads=2}", "gqa{kv_heads=2,method=aligned}", "mqa", "sqa{q_heads=2,kv_heads=1}",
         "dha{kv_ratio=0.5}", "prune-heads{ratio=0.25}", "prune-heads{heads={0:1/2;1:0}}",
         "moh{active_ratio=0.75}", "masa{atoms=2}", "lit", "clipped-softmax{gamma=-0.01}", "gated-attention",
         "local-heads{ratio=0.5,window=64,sinks=2,score=distance}", "local-heads{heads={0:0/1;1:2},window=8}",
         "mla", "mla{kv_rank=32,rope_dims=4,method=mha2mla}", "dha{kv_ratio=0.25,budget=uniform}",
         "moh{active_ratio=0.75,router=qnorm,shared=taylor}", "masa{atoms=2,refine_rank=4,refine_alloc=uniform}",
         "lit{feature_map=hedgehog}", "lit{feature_map=hedgehog,window=64}", "refit-output", "refit-output{ridge=0.01}",
         "refit-query", "refit-query{ridge=0.1}", "masa{atoms=2,fit=weights}"]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips(spec):
    p = parse(spec)[0]
    again = parse(p.spec())[0]
    assert again == p


def test_every_registered_pass_is_in_the_round_trip_list():
    names = {s.split("{")[0] for s in SPECS}
    assert names == set(rewrite.pipeline.available())


def test_caller_model_is_never_mutated():
    model = M.llama(2)
    model.train()  # capture must trace in eval mode and put the flag back
    before = copy.deepcopy(model.state_dict())
    tree = [(n, type(m)) for n, m in model.named_modules()]
    rewrite.convert(model, passes=[], example_inputs=_inputs(), progress=False)
    after = model.state_dict()
    assert model.training
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, type(m)) for n, m in model.named_modules()] == tree


def test_report_has_the_contract_keys():
    conv = rewrite.convert(M.llama(2), passes=[], example_inputs=_inputs(), progress=False)
    data = conv.report.to_json()
    assert data["pipeline"] == ""
    stage = data["stages"][0]
    for key in ("name", "exact", "sites_changed", "params", "q_heads", "kv_heads", "kv_cache_bytes_per_token",
                "attn_flops", "max_abs_err", "cosine", "seconds"):
        assert key in stage, key
    assert stage["q_heads"] == [4, 4] and stage["kv_heads"] == [2, 2]
    # 2 layers x (2 K heads + 2 V heads) x 16 dims x 4 bytes (fp32)
    assert stage["kv_cache_bytes_per_token"] == 2 * 4 * 16 * 4
    # 2 layers x 2*S*S*Hq*(dh+dv) at S=8
    assert stage["attn_flops"] == 2 * (2 * 8 * 8 * 4 * 32)
    assert stage["params"] == sum(p.numel() for p in M.llama(2).parameters())
    md = conv.report.to_markdown()
    assert "| captured | yes |" in md


def test_html_report_is_self_contained(tmp_path):
    conv = rewrite.convert(M.llama(4), passes=["gqa{kv_heads=2}"], example_inputs=_inputs(), progress=False)
    path = tmp_path / "r.html"
    page = conv.report.to_html(str(path))
    assert path.read_text() == page
    assert page.count("data:image/png;base64,") >= 2  # heads per layer, error per site
    assert "<script src" not in page and "http" not in page.split("<body>")[1]


def test_save_and_load_without_original_class(tmp_path):
    model = M.NanoGPT().eval()
    conv = rewrite.convert(model, passes=[], example_inputs=(M.ids(2, 8),), progress=False)
    path = str(tmp_path / "m.pt2")
    conv.save(path)
    again = rewrite.load(path)
    x = M.ids(3, 11)
    assert torch.allclose(again(x), model(x), atol=1e-5)
    assert again.report.to_json()["stages"][0]["name"] == "captured"
    assert type(again.module_).__module__.startswith("torch")


def test_called_with_other_inputs_than_captured():
    conv = rewrite.convert(M.llama(2), passes=[], example_inputs=_inputs(), progress=False)
    with pytest.raises(rewrite.RewriteError, match=r"captured with inputs \['input_ids', 'attention_mask'\]"):
        conv(M.ids(2, 8))


def test_missing_example_inputs():
    with pytest.raises(rewrite.RewriteError, match="convert needs example_inputs"):
        rewrite.convert(M.llama(2), passes=[])


@pytest.mark.parametrize("spec", ["dha{kv_ratio=0.5}", "gqa{kv_heads=2,method=aligned}"])
def test_pass_needing_calibration_without_it(spec):
    with pytest.raises(PassError, match="needs calibration data"):
        rewrite.convert(M.llama(4), passes=[spec], example_inputs=_inputs(), progress=False)


def test_calibration_batches_must_give_the_captured_inputs():
    import models as M
    from rewrite.errors import RewriteError

    example = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(RewriteError, match=r"calibration batch 0 gives the inputs \['input_ids'\], but the model "
                                           r"was captured with \['attention_mask', 'input_ids'\]"):
        rewrite.convert(M.llama(), "gqa{kv_heads=2,method=aligned}", example_inputs=example,
                        calibration=[(M.ids(2, 16),)], progress=False)
