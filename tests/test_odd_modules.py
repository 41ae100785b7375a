"""Fuzz-style: deliberately odd modules. Only ``rewrite.errors`` exceptions may leave ``convert`` and
``inspect``; whatever converts is exact at another batch and length. Also the candidates rule: a softmax
that is not over q·kᵀ of two token streams (an MoE router, a classifier) is not listed as a refusal."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models as M
import rewrite
from rewrite.recognize import layout as recognize_layout
from rewrite.errors import CaptureError, NoAttentionError, RewriteError

TOL = 1e-5


class Attn(nn.Module):
    """Multi-head self-attention with knobs for odd shapes and layouts."""

    def __init__(self, dim=64, heads=4, manual=False, rotary=None, softcap=None, transposed=False, causal=False):
        super().__init__()
        self.heads, self.manual, self.rotary, self.softcap, self.causal = heads, manual, rotary, softcap, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        if transposed:  # weights stored as transposed views: non-contiguous parameters
            for lin in (self.q, self.k, self.v, self.o):
                lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())

    def split(self, t):
        b, s, d = t.shape
        return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def rope(self, t):
        r = self.rotary
        rot, rest = t[..., :r], t[..., r:]
        pos = torch.arange(t.shape[2], dtype=t.dtype)[:, None] * torch.arange(1, r // 2 + 1, dtype=t.dtype)
        cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
        half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], -1)
        return torch.cat([rot * cos + half * sin, rest], -1)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.rotary is not None:
            q, k = self.rope(q), self.rope(k)
        if self.manual or self.softcap:
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if self.softcap:
                s = torch.tanh(s / self.softcap) * self.softcap
            y = torch.softmax(s, -1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(x.shape))


class Twice(nn.Module):
    """One attention module called twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, x):
        return self.attn(self.attn(x) + x)


class WithClassifier(nn.Module):
    """Attention followed by a softmax over a linear classifier (not attention)."""

    def __init__(self, only_classifier=False):
        super().__init__()
        self.attn, self.cls, self.only = Attn(manual=True), nn.Linear(64, 10), only_classifier

    def forward(self, x):
        h = x if self.only else self.attn(x)
        return torch.softmax(self.cls(h), -1)


class ZeroBranch(nn.Module):
    """A zero-width projection concatenated onto the query: zero-size dims inside the region."""

    def __init__(self):
        super().__init__()
        self.attn, self.empty = Attn(), nn.Linear(64, 0)

    def forward(self, x):
        return self.attn(x) + self.empty(x).sum(-1, keepdim=True)


class InPlaceWrite(Attn):
    """The attention input is built by writing into a buffer in place (export keeps ``copy_``, as in the
    recurrent scans of hybrid models): the write has no user but must survive dead-code elimination."""

    def forward(self, x):
        h = torch.zeros_like(x)
        h[:, :1] = x[:, :1] * 2.0
        return super().forward(x + h)


class UnderNoGrad(Attn):
    """Attention inside a ``torch.no_grad()`` block (HRM's early recurrent cycles): export puts it in a
    set-grad-enabled subgraph, which must not hide it from recognition."""

    def forward(self, x):
        with torch.no_grad():
            y = super().forward(x)
        return y + x


class KeepsState(Attn):
    """Stores a tensor on the module during forward (a recurrent state held between calls)."""

    def forward(self, x):
        self.state = x.mean(1)
        return super().forward(x)


def x(b, s, d=64):
    return torch.randn(b, s, d, generator=torch.Generator().manual_seed(b * 100 + s))


ODD = {
    # name: (factory, example input, another input or None, sites when it converts)
    "one-head": (lambda: Attn(heads=1), x(2, 8), x(3, 5), 1),
    "head-dim-1": (lambda: Attn(dim=4, heads=4), x(2, 8, 4), x(3, 5, 4), 1),
    "odd-width": (lambda: Attn(dim=21, heads=3), x(2, 8, 21), x(3, 5, 21), 1),
    "odd-width-manual": (lambda: Attn(dim=7, heads=7, manual=True), x(2, 8, 7), x(3, 5, 7), 1),
    "empty-rotary-pass-through": (lambda: Attn(rotary=16), x(2, 8), x(3, 5), 1),
    "partial-rotary": (lambda: Attn(rotary=8, causal=True), x(2, 8), x(3, 5), 1),
    "attention-used-twice": (Twice, x(2, 8), x(3, 5), 2),
    "softmax-over-classifier": (WithClassifier, x(2, 8), x(3, 5), 1),
    "non-contiguous-weights": (lambda: Attn(transposed=True, manual=True), x(2, 8), x(3, 5), 1),
    "seq-length-1": (Attn, x(2, 1), x(3, 5), 1),
    "batch-1-seq-1": (lambda: Attn(causal=True), x(1, 1), x(3, 5), 1),
    "zero-size-branch": (ZeroBranch, x(2, 8), x(3, 5), 1),
    "empty-batch": (Attn, x(0, 8), None, 1),
    "empty-sequence": (Attn, x(2, 0), None, 1),
    "zero-width": (lambda: Attn(dim=0, heads=1), x(2, 8, 0), None, 1),
    "soft-capped-scores": (lambda: Attn(softcap=5.0), x(2, 8), x(3, 5), 1),
    "in-place-write-before": (InPlaceWrite, x(2, 8), x(3, 5), 1),
    "under-no-grad": (UnderNoGrad, x(2, 8), x(3, 5), 1),
    "keeps-state": (KeepsState, x(2, 8), x(3, 5), 1),
}


def _only_rewrite_errors(fn):
    """fn()'s result, or None when it raised one of rewrite.errors (anything else fails the test)."""
    try:
        return fn()
    except RewriteError:
        return None


@pytest.mark.parametrize("name", list(ODD))
def test_only_rewrite_errors_escape_and_what_converts_is_exact(name):
    factory, example, other, n_sites = ODD[name]
    torch.manual_seed(0)
    model = factory().eval()
    _only_rewrite_errors(lambda: rewrite.inspect(model, (example,)))
    conv = _only_rewrite_errors(lambda: rewrite.convert(model, passes=[], example_inputs=(example,), progress=False))
    if conv is None:
        return
    assert len(conv.sites) == n_sites, name
    for inputs in [(example,)] + ([(other,)] if other is not None else []):
        assert M.rel_err(model, conv, inputs)[0] <= TOL, name


@pytest.mark.parametrize("name", ["one-head", "head-dim-1", "odd-width", "empty-rotary-pass-through",
                                  "partial-rotary", "attention-used-twice", "softmax-over-classifier",
                                  "non-contiguous-weights", "seq-length-1", "batch-1-seq-1", "zero-size-branch",
                                  "in-place-write-before", "soft-capped-scores", "under-no-grad"])
def test_odd_but_valid_modules_convert(name):
    factory, example, _, n_sites = ODD[name]
    conv = rewrite.convert(factory().eval(), passes=[], example_inputs=(example,), progress=False)
    assert len(conv.sites) == n_sites and conv.report.refusals == []


def test_a_module_keeping_state_between_calls_is_refused_by_name():
    with pytest.raises(CaptureError, match=r"keeps state between calls: its forward assigns the tensor attribute "
                                           r"'self.state'"):
        rewrite.convert(KeepsState().eval(), passes=[], example_inputs=(x(2, 8),), progress=False)


def test_empty_example_is_refused_by_name():
    with pytest.raises(CaptureError, match=r"example input 'x' of shape \(0, 8, 64\) is empty along dim 0"):
        rewrite.convert(Attn().eval(), passes=[], example_inputs=(x(0, 8),), progress=False)


class TanhScores(Attn):
    """softmax(tanh(s)) · v: a tanh of the scores that is not a soft-cap c·tanh(s/c)."""

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        s = torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
        return self.o((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(x.shape))


def test_a_tanh_that_is_no_soft_cap_is_refused_by_name():
    found = rewrite.inspect(TanhScores().eval(), (x(2, 8),))
    assert len(found) == 0 and "unsupported op 'tanh' between the score matmul and softmax" in str(found.refusals[0])
    with pytest.raises(NoAttentionError, match="tanh"):
        rewrite.convert(TanhScores().eval(), passes=[], example_inputs=(x(2, 8),), progress=False)


def test_softmax_over_a_classifier_alone_is_not_a_candidate():
    found = rewrite.inspect(WithClassifier(only_classifier=True).eval(), (x(2, 8),))
    assert len(found) == 0 and found.refusals == []


def test_unexpected_failure_in_matching_is_a_refusal_naming_module_and_op(monkeypatch):
    def broken(*args, **kwargs):
        raise IndexError("index 0 is out of bounds")

    monkeypatch.setattr(recognize_layout, "_classify", broken)
    model = M.llama(2, layers=1)
    found = rewrite.inspect(model, (M.ids(2, 8),))
    assert len(found) == 0
    (refusal,) = found.refusals
    assert str(refusal).startswith("model.layers.0.self_attn: unexpected IndexError while reading '")
    assert "index 0 is out of bounds" in str(refusal)
    with pytest.raises(NoAttentionError, match="model.layers.0.self_attn: unexpected IndexError"):
        rewrite.convert(model, passes=[], example_inputs=(M.ids(2, 8),), progress=False)


def mixtral():
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=M.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_moe_router_softmax_is_not_listed_as_unrecognized_attention():
    torch.manual_seed(0)
    model = mixtral()
    conv = rewrite.convert(model, passes=[], example_inputs=(M.ids(2, 8),), progress=False)
    assert len(conv.sites) == 2 and conv.report.refusals == []
    assert M.rel_err(model, conv, (M.ids(3, 13),))[0] <= TOL


class BiasThenFill(Attn):
    """MPT's order: scores + bias, then masked_fill(finfo.min); fully hidden rows average every value."""

    def __init__(self):
        super().__init__(manual=True)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x, keep):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        s = q @ k.transpose(-2, -1) / 4.0 + self.bias * torch.arange(x.shape[1], dtype=x.dtype)
        s = s.masked_fill(~keep[:, None, None, :].bool(), torch.finfo(x.dtype).min)
        return self.o((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(x.shape))


def test_finite_fill_after_a_bias_is_exact_where_every_key_is_hidden():
    model = BiasThenFill().eval()
    keep = torch.ones(2, 8, dtype=torch.long)
    conv = rewrite.convert(model, passes=[], example_inputs=(x(2, 8), keep), progress=False)
    assert len(conv.sites) == 1 and conv.sites[0].info.mask_kind == "additive"
    keep = torch.ones(3, 13, dtype=torch.long)
    keep[0] = 0  # every key hidden: the original averages all values
    keep[1, :5] = 0
    assert M.rel_err(model, conv, (x(3, 13), keep))[0] <= TOL
