"""Multi-head latent attention (issue 14): DeepSeek-V2/V3 captured into ``LatentAttention`` exactly (with and without a
low-rank query, both RoPE layouts), decoded with the latent cache, and refused by head-count passes by name."""
from __future__ import annotations

import functools

import pytest
import torch

import rewrite
from rewrite.api import restage
from rewrite import families as fam
from rewrite.errors import PassError, SpecError
from rewrite.latent import LatentAttention

VARIANTS = {  # name: (family, config changes)
    "v3": ("deepseek_v3", {}),  # q_lora_rank 32, interleaved RoPE
    "v3-no-q-lora-rotate-half": ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False}),
    "v2": ("deepseek_v2", {}),  # complex RoPE (view_as_complex)
    "v2-no-q-lora": ("deepseek_v2", {"q_lora_rank": None}),
}


@functools.lru_cache(maxsize=None)
def deepseek(variant: str):
    family, changes = VARIANTS[variant]
    cfg = fam.tiny_config(family)
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = fam.model_class(family)(cfg).eval()
    conv = rewrite.convert(model, passes=[], example_inputs=fam.make_inputs(model, 2, 8), progress=False)
    return model, conv


@pytest.mark.parametrize("variant", VARIANTS)
def test_deepseek_round_trips_exactly(variant):
    model, conv = deepseek(variant)
    cfg = model.config
    assert len(conv.sites) == cfg.num_hidden_layers == fam.count_attention(model, fam.make_inputs(model, 2, 8))
    for op in conv.sites:
        assert isinstance(op, LatentAttention)
        assert (op.q_heads, op.kv_rank, op.rope_dim, op.nope_dim, op.v_head_dim, op.rope_heads) == (
            cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, 1)
        assert (op.w_dq is None) == (cfg.q_lora_rank is None)
        assert op.kv_cache_bytes_per_token(2) == 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    for pad in (False, True):  # another batch and length than traced
        err = fam.rel_err(model, conv, fam.make_inputs(model, 3, 13, pad=pad, seed=1))
        assert err <= fam.EXACT_TOL, f"pad={pad}: {err:.2e}"


@pytest.mark.parametrize("variant", ["v3", "v2-no-q-lora"])
def test_deepseek_decodes_with_the_latent_cache(variant):
    model, conv = deepseek(variant)
    cfg = model.config
    ids = fam.make_inputs(model, 3, 9, pad=False, seed=2)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, **greedy)
    assert torch.equal(conv.generate(ids, attention_mask=mask, **greedy), ref)
    hf = conv.to_transformers()
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, use_cache=True)
        step = hf(ref[:, 9:10], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=out.past_key_values,
                  use_cache=True)
        full = hf(ref[:, :10], attention_mask=torch.cat([mask, mask[:, :1]], 1), use_cache=False)
    for layer in step.past_key_values.layers:  # the latent and the shared RoPE key, no per-head K/V
        assert tuple(layer.keys.shape) == (3, 1, 10, cfg.kv_lora_rank)
        assert tuple(layer.values.shape) == (3, 1, 10, cfg.qk_rope_head_dim)
    # the absorbed decode step equals the uncached computation
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_other_passes_refuse_latent_sites_by_name():
    model, conv = deepseek("v3")  # every pass restages this one capture
    for spec in ("gqa{kv_heads=2}", "mqa"):
        with pytest.raises(SpecError, match=r"no site can take it: model\.layers\.0\.self_attn is multi-head latent "
                                            r"attention \(keys and values are up-projected from a shared latent\); "
                                            r"this pass does not apply to it"):
            restage(conv, spec)
    with pytest.raises(PassError, match=r"model\.layers\.0\.self_attn is multi-head latent attention"):
        restage(conv, "prune-heads{ratio=0.5,importance=magnitude}")
    res = restage(conv, "gated-attention")
    skips = res.report.stages[-1].diagnostics
    assert len(skips) == 2 and "model.layers.1.self_attn is multi-head latent attention" in skips[1]
    assert all(isinstance(op, LatentAttention) for op in res.sites)
    assert fam.rel_err(model, res, fam.make_inputs(model, 3, 13, seed=1)) <= fam.EXACT_TOL


def test_deepseek_save_pretrained_stock():
    import subprocess
    import sys
    import tempfile

    model, conv = deepseek("v3-no-q-lora-rotate-half")
    with tempfile.TemporaryDirectory() as d:
        out = conv.save_pretrained(d + "/hf")  # captured MLA, unchanged: the stock DeepSeek-V3 folder
        assert out["kind"] == "stock", out
        ids = fam.make_inputs(model, 2, 7, seed=3)["input_ids"]
        torch.save(ids, d + "/ids.pt")
        code = ("import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(%r).eval(); "
                "print(m.config.model_type); torch.save(m(torch.load(%r)).logits, %r)" % (d + "/hf", d + "/ids.pt",
                                                                                         d + "/out.pt"))
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "deepseek_v3" in run.stdout, run.stderr[-2000:]
        with torch.no_grad():
            ref = fam._first(conv(input_ids=ids, attention_mask=torch.ones_like(ids)))
        torch.testing.assert_close(torch.load(d + "/out.pt"), ref, rtol=1e-4, atol=1e-4)
    # the ONNX decoder and the Triton backend: tests/backends/test_onnx_decoder_latent.py, test_triton_mla.py
