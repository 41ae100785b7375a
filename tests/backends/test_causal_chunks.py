"""Causal sites exported as query chunks that skip the hidden key blocks (``causal_chunks``).

Recognition marks a self-attention site ``causal_mask`` when its mask hides every later key on the
example inputs, on resized ones and on inputs with scrambled values (so that a mask the caller passes
in is not mistaken for causal). The chunked ONNX graph must equal PyTorch at other batch sizes and
sequence lengths, shorter than the number of chunks included, with padding on either side.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import rewrite
from rewrite.backends.ort_session import make_session, run_session
from rewrite.errors import BackendError

TOL = 1e-4


def _padded(seq, left=False, batch=2, seed=0):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if seq > 2:
        mask[1, :2] = 0 if left else 1
        mask[1, seq - 2:] = 1 if left else 0
    return {"input_ids": models.ids(batch, seq, seed=seed), "attention_mask": mask}


class CausalSDPA(nn.Module):
    """Self-attention through ``scaled_dot_product_attention(is_causal=True)`` with no mask tensor."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))


class GivenMask(nn.Module):
    """Self-attention whose additive 4D mask is an input: causal in the example only."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


def _causal_additive(b, s):
    return torch.zeros(s, s).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).expand(b, 1, s, s)


def _convert(model, inputs):
    return rewrite.convert(model, passes="", example_inputs=inputs, progress=False)


@functools.lru_cache(maxsize=None)
def _llama():
    """One capture of a GQA LLaMA layer (4 query heads, 2 KV heads) for the tests that only read it."""
    return _convert(models.llama(kv_heads=2, layers=1), _padded(8))


def test_causal_masks_are_recognized():
    assert [op.info.causal_mask for op in _llama().sites] == [True]
    nano = models.NanoGPT()
    assert [op.info.causal_mask for op in _convert(nano, nano.example_inputs()).sites] == [True, True]
    assert not any(op.info.causal_mask for op in _convert(models.bert(layers=1), _padded(8)).sites)  # padding only


def test_a_mask_passed_in_is_not_taken_for_causal():
    """Causal in the example, but it is the caller's tensor: scrambled inputs show it can be anything."""
    x = torch.randn(2, 8, 64)
    conv = _convert(GivenMask().eval(), {"x": x, "mask": _causal_additive(2, 8)})
    assert conv.sites[0].info.mask_kind == "additive" and not conv.sites[0].info.causal_mask


def _chunked_file(conv, tmp_path, chunks):
    info = conv.export_onnx(str(tmp_path / f"c{chunks}.onnx"), causal_chunks=chunks)
    return info, make_session(info["path"])


def _max_err(conv, session, inputs):
    with torch.no_grad():
        want = models.first_tensor(conv(**inputs))
    return (run_session(session, inputs)[0] - want).abs().max().item()


def test_llama_chunks_match_pytorch(tmp_path):
    conv = _llama()
    info, session = _chunked_file(conv, tmp_path, 4)
    assert info["attention_nodes"] == 4 * len(conv.sites) and info["causal_chunks"] == 4
    assert set(info["kv_num_heads"]) == {2}  # GQA stays native in every chunk
    assert info["max_abs_err"] <= TOL
    for seq, left in ((13, False), (13, True), (3, False), (1, False), (37, True)):
        assert _max_err(conv, session, _padded(seq, left, batch=3, seed=seq)) <= TOL, (seq, left)


def test_causal_sdpa_without_mask_chunks(tmp_path):
    """``is_causal=True`` and no mask tensor: the chunks build their own triangle."""
    conv = _convert(CausalSDPA().eval(), (torch.randn(2, 8, 64),))
    op = conv.sites[0]
    assert op.causal and op.info.mask_kind is None
    info, session = _chunked_file(conv, tmp_path, 3)
    assert info["attention_nodes"] == 3
    for b, s in ((3, 11), (1, 2), (2, 1)):
        x = torch.randn(b, s, 64)
        assert _max_err(conv, session, {"x": x}) <= TOL, (b, s)


def test_non_causal_sites_stay_one_node(tmp_path):
    conv = _convert(models.bert(layers=1), _padded(8))
    info = conv.export_onnx(str(tmp_path / "b.onnx"), causal_chunks=4)
    assert info["attention_nodes"] == len(conv.sites) and info["max_abs_err"] <= TOL


def test_bad_chunk_count_is_refused(tmp_path):
    conv = _llama()
    with pytest.raises(BackendError, match=r"causal_chunks=0: expected an int >= 1 \(1 = one Attention node per site\)"):
        conv.export_onnx(str(tmp_path / "x.onnx"), causal_chunks=0)
