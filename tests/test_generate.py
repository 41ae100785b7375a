"""Generation with converted decoders: conv.generate / to_transformers, a KV cache at the converted head counts."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

import models as M
import rewrite
from rewrite.api import restage
from rewrite.cache import LinearStateLayer, cache_bytes
from rewrite.hf_adapter import GenerationError

DECODERS = {"llama-mha": lambda: M.llama(kv_heads=4), "llama-gqa": lambda: M.llama(kv_heads=2), "qwen2": M.qwen2,
            "qwen3": M.qwen3, "gemma": M.gemma, "phi3": M.phi3, "gpt2": M.gpt2}
# exact pipelines: gqa{kv_heads=4} is a no-op on MHA and KV duplication on the GQA families; identity clipping
# and gates; no passes and MoH with every head active (its router runs) on two families each
EXACT = {family: ["gqa{kv_heads=4},clipped-softmax,gated-attention"] for family in DECODERS}
EXACT["llama-gqa"] += ["", "moh{active_ratio=1.0}"]
EXACT["gpt2"].insert(0, "")
EXACT["qwen3"].append("moh{active_ratio=1.0}")
LOSSY = ["gqa{kv_heads=2}", "gqa{kv_heads=1,method=aligned}", "dha{kv_ratio=0.5}", "sqa{q_heads=2,kv_heads=2}",
         "prune-heads{ratio=0.5,importance=magnitude,scope=global}", "moh{active_ratio=0.75,shared_ratio=0.25}",
         "moh{active_ratio=0.5,router=qnorm}", "lit", "masa{atoms=1}", "clipped-softmax{zeta=1.1,gamma=-0.05}",
         "gated-attention{init=normal,std=0.5}"]
GREEDY = dict(max_new_tokens=32, do_sample=False, pad_token_id=0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same random models whatever ran before (MoH routing has near-ties otherwise)


def left_padded(batch=3, seq=9):
    ids = M.ids(batch, seq, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def converted(model, spec, **kw):
    calibration = [(M.ids(2, 16, seed=s),) for s in (3, 4)]
    return rewrite.convert(model, spec, example_inputs=(M.ids(2, 8),), calibration=calibration, progress=False, **kw)


@pytest.mark.parametrize("family", DECODERS)
def test_exact_pipelines_decode_token_for_token(family):
    model = DECODERS[family]()
    ids, mask = left_padded()
    ref = model.generate(ids, attention_mask=mask, **GREEDY)
    for spec in EXACT[family]:
        conv = converted(model, spec)
        assert torch.equal(conv.generate(ids, attention_mask=mask, **GREEDY), ref), spec
    beams = dict(num_beams=4, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(conv.generate(ids, attention_mask=mask, **beams), model.generate(ids, attention_mask=mask, **beams))


def _prefill_then_decode(hf, ids, mask, prefill: int):
    """Logits of a prefill of ``prefill`` tokens and then one token at a time, with one DynamicCache."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=hf.config)
    steps = [hf(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                cache=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        steps.append(hf(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                        cache=cache, use_cache=True).logits)
    full = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return torch.cat(steps, 1), full, cache


@functools.lru_cache(maxsize=None)
def _llama_capture():
    """One capture of the seeded 4-head LLaMA; every LOSSY pipeline restages it (``rewrite.api.restage``)."""
    torch.manual_seed(0)
    return converted(M.llama(kv_heads=4), "")


@pytest.mark.parametrize("spec", LOSSY)
def test_cached_logits_equal_uncached_for_every_pass(spec):
    conv = restage(_llama_capture(), spec, calibration=[{"input_ids": M.ids(2, 16, seed=s)} for s in (3, 4)])
    ids, mask = left_padded(3, 14)
    with torch.no_grad():
        cached, full, _ = _prefill_then_decode(conv.to_transformers(), ids, mask, prefill=9)
    assert float((cached - full).abs().max() / full.abs().max()) <= 1e-5


@pytest.mark.parametrize("spec", ["gqa{kv_heads=2}", "dha{kv_ratio=0.5}",
                                  "prune-heads{ratio=0.5,importance=magnitude,scope=global}"])
def test_measured_cache_bytes_equal_the_report(spec):
    model = M.llama(kv_heads=8, heads=8)
    conv = converted(model, spec)
    ids = M.ids(2, 7)
    out = conv.hf_model().generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    tokens = ids.shape[1] + 5 - 1  # the last token is produced, never fed back
    measured = cache_bytes(out.cache)
    per_site = [op.kv_cache_bytes_per_token(4) * tokens * ids.shape[0] for op in conv.sites]
    assert measured == per_site
    stage = conv.report.to_json()["stages"][-1]
    assert sum(measured) == stage["kv_cache_bytes_per_token"] * tokens * ids.shape[0]
    if spec.startswith("gqa"):
        orig = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert [4 * b for b in measured] == cache_bytes(orig.cache)  # 2 of 8 KV heads: exactly a quarter


def test_linear_attention_state_does_not_grow():
    conv = converted(M.llama(kv_heads=4), "lit")
    hf = conv.to_transformers()
    sizes = []
    for length in (64, 1024):
        cache = DynamicCache(config=hf.config)
        with torch.no_grad():
            hf(input_ids=M.ids(1, length), cache=cache, use_cache=True)
        assert all(isinstance(layer, LinearStateLayer) for layer in cache.layers)
        assert cache.get_seq_length() == length
        sizes.append(cache_bytes(cache))
    assert sizes[0] == sizes[1] and sizes[0][0] == (4 * 16 * 16 + 4 * 16) * 4  # (S, z) of 4 heads of 16, fp32
    stage = conv.report.to_json()["stages"][-1]
    assert stage["kv_cache_bytes_per_token"] == 0 and stage["state_bytes"] == sum(sizes[0])  # the report predicts it


def test_static_cache_and_non_contiguous_batch_one_prompts():
    model = M.llama(kv_heads=2)
    conv = converted(model, "gqa{kv_heads=4}")
    ids = M.ids(4, 30)[::2, 5:17]  # a non-contiguous slice
    assert not ids.is_contiguous()
    ref = model.generate(ids, **GREEDY)
    assert torch.equal(conv.generate(ids, cache_implementation="static", **GREEDY), ref)
    assert torch.equal(conv.generate(ids[:1], **GREEDY), model.generate(ids[:1], **GREEDY))


def test_to_transformers_shares_the_weights_and_leaves_the_source_alone():
    model = M.llama(kv_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = converted(model, "gqa{kv_heads=1}")
    hf = conv.to_transformers()
    assert hf.model.embed_tokens.weight is conv.gm.model.embed_tokens.weight
    assert hf.model.layers[0].self_attn.op is conv.sites[0]
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_generate_refuses_encoders_and_non_hugging_face_models():
    bert = rewrite.convert(M.bert(), [], example_inputs=(M.ids(2, 8),), progress=False)
    with pytest.raises(GenerationError, match="encoder-only or base model that cannot generate"):
        bert.generate(M.ids(1, 4))
    nano = rewrite.convert(M.NanoGPT(), [], example_inputs=(M.ids(2, 8),), progress=False)
    with pytest.raises(GenerationError, match="needs a Hugging Face model.*NanoGPT is not one"):
        nano.generate(M.ids(1, 4))
    with pytest.raises(GenerationError, match=r"save it with conv.save\('model.pt2'\)"):
        nano.save_pretrained("unused")


def test_trainer_and_peft_train_the_converted_decoder(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    conv = converted(M.llama(kv_heads=4), "gqa{kv_heads=2},gated-attention")
    hf = conv.to_transformers()
    gate = conv.sites[0].head_gate.bias.detach().clone()
    ids = M.ids(8, 12, seed=5)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=hf, args=args, train_dataset=data).train()
    assert not torch.equal(conv.sites[0].head_gate.bias, gate)  # the shared op was trained through the HF model
    lora = get_peft_model(conv.to_transformers(), LoraConfig(r=2, target_modules=["gate_proj"], lora_alpha=4))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = lora(input_ids=ids[:2], labels=ids[:2]).loss
    loss.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
