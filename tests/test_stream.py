"""Streaming conversion of Hugging Face folders (rewrite.stream): tiny LLaMA / Qwen2 checkpoints in many shards."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers

import rewrite
from rewrite.errors import PassError, RewriteError
from rewrite.shards import read_header
from rewrite.stream import convert_folder, pipeline_tier, tier_of

from models import VOCAB, gpt2, ids

SHARD = "200KB"


def _llama(kv_heads=4, bias=False):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2():
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so pooling them is checked
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, model in (("llama", _llama()), ("qwen2", _qwen2()), ("gpt2", gpt2())):
        out[name] = str(root / name)
        model.save_pretrained(out[name], max_shard_size=SHARD)
        out[name + "_model"] = model
    return out


def _logits(folder, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits


def _check_against_memory(folder, model, spec, tmp_path):
    out = str(tmp_path / "out")
    report = convert_folder(folder, spec, out, progress=False)
    x = ids(2, 11)  # a batch and length other than the template's
    conv = rewrite.convert(model, spec, example_inputs=(ids(),), progress=False)
    with torch.no_grad():
        want = conv(x).logits
    got = _logits(out, x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    return out, report


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_streams_and_matches_the_in_memory_conversion(folders, family, tmp_path):
    folder = folders[family]
    out, report = _check_against_memory(folder, folders[family + "_model"], "gqa{kv_heads=2}", tmp_path)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 3 and sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    header, _ = read_header(os.path.join(out, _shard_of(out, "model.layers.1.self_attn.k_proj.weight")))
    assert header["model.layers.1.self_attn.k_proj.weight"]["shape"] == [64, 128]
    data = report.to_json()
    original, gqa = data["stages"]
    assert original["kv_heads"] == [4, 4, 4] and gqa["kv_heads"] == [2, 2, 2] and gqa["q_heads"] == [4, 4, 4]
    assert gqa["kv_cache_bytes_per_token"] * 2 == original["kv_cache_bytes_per_token"]
    removed = 3 * 2 * 2 * 32 * 128 + (3 * 2 * 2 * 32 if family == "qwen2" else 0)  # k and v rows (+ biases)
    assert original["params"] - gqa["params"] == removed
    assert gqa["sites_changed"] == 3 and 0 < gqa["max_abs_err"] and gqa["cosine"] < 1
    assert data["extras"]["streaming"]["mode"] == "streamed layer by layer"


def _shard_of(folder, name):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


def test_bf16_single_file_keeps_dtype_and_exact_pass_is_verified(tmp_path):
    torch.manual_seed(2)
    src = str(tmp_path / "bf16")
    _llama(kv_heads=2).to(torch.bfloat16).save_pretrained(src)  # one model.safetensors, no index
    out = str(tmp_path / "out")
    report = convert_folder(src, "gqa{kv_heads=4}", out, progress=False)  # duplicate KV heads: exact
    header, _ = read_header(os.path.join(out, "model.safetensors"))
    entry = header["model.layers.2.self_attn.v_proj.weight"]
    assert entry["dtype"] == "BF16" and entry["shape"] == [128, 128]
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert report.to_json()["stages"][1]["max_abs_err"] == 0.0
    x = ids(1, 9)
    a = _logits(src, x).float()
    b = _logits(out, x).float()
    assert torch.equal(a, b)


def test_whole_model_pass_runs_on_the_attention_of_every_layer(folders, tmp_path):
    spec = "prune-heads{ratio=0.5,importance=magnitude,scope=layer}"
    with pytest.warns(RuntimeWarning, match="prune-heads needs every layer at once; converting in memory"):
        out, report = _check_against_memory(folders["llama"], folders["llama_model"], spec, tmp_path)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 32)
    assert report.to_json()["extras"]["streaming"]["mode"].startswith("attention of every layer in memory")


def _word_tokenizer(folder):
    """An offline word-level tokenizer over words w0..w94 (ids below the tiny vocabulary)."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"[UNK]": VOCAB - 2, "[PAD]": VOCAB - 1})
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        folder)


def test_calibration_pass_streams_layer_by_layer(folders, tmp_path):
    src = str(tmp_path / "with_tokenizer")
    shutil.copytree(folders["llama"], src)
    _word_tokenizer(src)
    g = torch.Generator().manual_seed(3)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (12,), generator=g))
                              for _ in range(16)))
    out = str(tmp_path / "out")
    report = convert_folder(src, "gqa{kv_heads=2,method=aligned}", out, calibration_file=str(text), progress=False)
    data = report.to_json()
    assert data["extras"]["streaming"]["mode"].startswith("calibrated, streamed layer by layer")
    assert data["stages"][-1]["kv_heads"] == [2, 2, 2] and 0 < data["stages"][-1]["cosine"] < 1
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_key_value_heads"] == 2
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))  # side files are copied
    assert _logits(out, ids()).shape == (2, 8, VOCAB)


def test_tiers():
    specs = ("gqa{kv_heads=2}", "mqa", "gated-attention", "prune-heads{heads=0:1}", "masa",
             "gqa{kv_heads=2,method=aligned}", "dha{kv_ratio=0.5}", "prune-heads{ratio=0.5,importance=entropy}",
             "prune-heads{ratio=0.5}", "masa{refine_rank=2}")
    tiers = [tier_of(rewrite.parse_pipeline(spec)[0]) for spec in specs]
    assert tiers == ["site", "site", "site", "attention", "attention", "layers", "layers", "layers", "model", "model"]
    mixed = rewrite.parse_pipeline("prune-heads{ratio=0.5,importance=magnitude},gqa{kv_heads=2,method=aligned}")
    assert pipeline_tier(mixed) == "model"


def test_refusals(folders, tmp_path, monkeypatch):
    with pytest.raises(RewriteError, match="has no config.json; expected a Hugging Face model folder"):
        convert_folder(str(tmp_path), "gqa{kv_heads=2}", str(tmp_path / "o"))
    broken = str(tmp_path / "broken")
    shutil.copytree(folders["llama"], broken)
    gone = _shard_of(broken, "model.layers.1.mlp.up_proj.weight")
    os.remove(os.path.join(broken, gone))
    with pytest.raises(RewriteError, match=f"shard {gone} listed in model.safetensors.index.json is missing"):
        convert_folder(broken, "gqa{kv_heads=2}", str(tmp_path / "o"))
    with pytest.raises(RewriteError, match="GPT2LMHeadModel stores q, k and v in one fused tensor"):
        convert_folder(folders["gpt2"], "gqa{kv_heads=2}", str(tmp_path / "o"), progress=False)
    with pytest.raises(PassError, match="needs calibration data: --calibration FILE"):
        convert_folder(folders["llama"], "gqa{kv_heads=2,method=aligned}", str(tmp_path / "o"))


def test_refusals_leave_no_output(folders, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with pytest.raises(RewriteError, match="non-uniform heads per layer: layer 0 has .* layer 1 has"):
        convert_folder(folders["llama"], "prune-heads{heads=1:0}", str(out), progress=False)
    with pytest.raises(RewriteError, match=r"LlamaForCausalLM cannot hold \(q, kv, head size\) = \(3, 3, 32\): .*"
                                           "hidden size .* not a multiple"):  # transformers' own validation
        convert_folder(folders["llama"], "prune-heads{heads=0:1;1:1;2:1}", str(out), progress=False)
    with pytest.raises(RewriteError, match="adds a head gate; the family.s stock config cannot hold it"):
        convert_folder(folders["llama"], "gated-attention", str(out), progress=False)
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")
    monkeypatch.setattr("rewrite.stream.available_memory", lambda: 1 << 20)
    with pytest.raises(PassError, match="prune-heads needs every layer at once: .* GiB are available. Refused"):
        convert_folder(folders["llama"], "prune-heads{ratio=0.25,importance=magnitude}", str(out), progress=False)
