"""conv.save_pretrained: stock folders where the config can express the result, custom-code folders otherwise;
both reload in a fresh process with the same logits and greedy tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import models as M
import rewrite
from rewrite.api import restage

# spec -> the folder kind it must give
SPECS = {"": "stock", "gqa{kv_heads=2}": "stock", "gqa{kv_heads=1,method=aligned}": "stock",
         "sqa{q_heads=2,kv_heads=2}": "stock", "prune-heads{ratio=0.5,importance=magnitude}": "stock",
         "dha{kv_ratio=0.5}": "custom", "moh{active_ratio=0.75,shared_ratio=0.25}": "custom", "lit": "custom",
         "masa{atoms=1}": "custom", "clipped-softmax{zeta=1.1,gamma=-0.05}": "custom",
         "gated-attention{init=normal,std=0.5}": "custom"}
TRAINED = ("moh", "gated-attention")  # reloaded and trained one step: router / gate parameters must move

CHECK = r'''
import json, sys, torch
if sys.argv[1] == "block":  # prove the stock folders need nothing of rewrite
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "rewrite" or name.startswith("rewrite."):
                raise ImportError("rewrite is not installed in this process")
    sys.meta_path.insert(0, Block())
elif sys.argv[1] == "import":
    import rewrite  # registers rewrite_* model types: no trust_remote_code needed
from transformers import AutoModelForCausalLM
out = {}
for i, folder in enumerate(sys.argv[2:]):
    kw = {"trust_remote_code": True} if sys.argv[1] == "trust" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    e = torch.load(folder + "/expect.pt")
    with torch.no_grad():
        logits = model(input_ids=e["ids"], attention_mask=e["mask"]).logits
        tokens = model.generate(e["ids"], attention_mask=e["mask"], max_new_tokens=12, do_sample=False, pad_token_id=0)
    moved = None
    if e["train"]:
        names = [n for n, _ in model.named_parameters() if "head_gate" in n]
        before = [p.detach().clone() for n, p in model.named_parameters() if n in names]
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = model(input_ids=e["ids"], labels=e["ids"]).loss
        loss.backward()
        opt.step()
        moved = bool(names) and all(not torch.equal(a, p) for a, (n, p) in
                                    zip(before, [(n, p) for n, p in model.named_parameters() if n in names]))
    out[folder] = {"class": type(model).__name__, "err": float((logits - e["logits"]).abs().max()),
                   "tokens": bool(torch.equal(tokens, e["tokens"])), "moved": moved}
print("RESULT" + json.dumps(out))
'''


def _fresh(mode: str, folders: list) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", CHECK, mode, *folders], capture_output=True, text=True, env=env,
                         timeout=600, cwd="/")
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT")]
    assert line, run.stderr[-3000:]
    return json.loads(line[0][len("RESULT"):])


def _expect(conv, folder: str, ids, mask, train: bool = False) -> dict:
    """What the fresh process must reproduce, saved as ``folder/expect.pt``: logits and 12 greedy tokens."""
    with torch.no_grad():
        expect = {"ids": ids, "mask": mask, "train": train,
                  "logits": conv.hf_model()(input_ids=ids, attention_mask=mask).logits,
                  "tokens": conv.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)}
    torch.save(expect, os.path.join(folder, "expect.pt"))
    return expect


def test_every_pass_reloads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = M.llama(kv_heads=4)
    calibration = [(M.ids(2, 16, seed=s),) for s in (3, 4)]
    ids = M.ids(3, 9, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    folders = {"stock": [], "custom": []}
    base = rewrite.convert(model, "", example_inputs=(M.ids(2, 8),), progress=False)
    for i, (spec, kind) in enumerate(SPECS.items()):  # one capture serves every pipeline
        conv = restage(base, spec, calibration=[{"input_ids": c[0]} for c in calibration]) if spec else base
        folder = str(tmp_path / f"m{i}")
        info = conv.save_pretrained(folder)
        assert info["kind"] == kind, (spec, info["reason"])
        if kind == "custom":
            assert info["reason"] and os.path.isfile(os.path.join(folder, "modeling_rewrite.py"))
            cfg = json.load(open(os.path.join(folder, "config.json")))
            assert cfg["model_type"] == "rewrite_llama" and "AutoModelForCausalLM" in cfg["auto_map"]
        _expect(conv, folder, ids, mask, train=spec.startswith(TRAINED))
        folders[kind].append(folder)
    results = {**_fresh("block", folders["stock"]), **_fresh("trust", folders["custom"][1:]),
               **_fresh("import", folders["custom"][:1])}
    for folder, r in results.items():
        assert r["err"] == 0.0 and r["tokens"], (folder, r)
        assert r["class"] == ("LlamaForCausalLM" if folder in folders["stock"] else "RewriteLlamaForCausalLM")
        assert r["moved"] in (None, True), (folder, r)
    assert sum(r["moved"] is True for r in results.values()) == 2


def test_stock_folder_changes_the_config_head_counts(tmp_path):
    conv = rewrite.convert(M.qwen3(), "gqa{kv_heads=1}", example_inputs=(M.ids(2, 8),), progress=False)
    info = conv.save_pretrained(str(tmp_path / "q"))
    cfg = json.load(open(tmp_path / "q" / "config.json"))
    assert info["kind"] == "stock" and cfg["model_type"] == "qwen3"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 16)


def test_fused_projections_that_change_size_get_a_custom_folder(tmp_path):
    conv = rewrite.convert(M.gpt2(), "gqa{kv_heads=1}", example_inputs=(M.ids(2, 8),), progress=False)
    info = conv.save_pretrained(str(tmp_path / "g"))
    assert info["kind"] == "custom"
    assert "c_attn.weight holds wq with other projections (fused)" in info["reason"]
    again = rewrite.convert(M.gpt2(), [], example_inputs=(M.ids(2, 8),), progress=False).save_pretrained(
        str(tmp_path / "g0"))
    assert again["kind"] == "stock"  # unchanged sizes write back into the fused tensor


def test_tokenizer_is_copied_and_an_encoder_saves_too(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model = M.minilm()
    enc = M.minilm_tokenizer(16)(["a short sentence", "another one, a little longer"])
    conv = rewrite.convert(model, "gated-attention", example_inputs=enc, progress=False)
    info = conv.save_pretrained(str(tmp_path / "mini"))
    assert info["kind"] == "custom" and "tokenizer.json" in info["tokenizer"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "mini"))
    again = AutoModel.from_pretrained(str(tmp_path / "mini")).eval()  # rewrite is imported: no flag needed
    with torch.no_grad():
        assert torch.allclose(again(**enc).last_hidden_state, conv(**enc).last_hidden_state, atol=1e-6)
    assert tok("a short sentence")["input_ids"] == enc["input_ids"][0][:5].tolist()


def test_save_pretrained_writes_atomically(tmp_path, monkeypatch):
    conv = rewrite.convert(M.llama(kv_heads=2), "lit", example_inputs=(M.ids(2, 8),), progress=False)
    target = tmp_path / "out"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("rewrite.hf_save._copy_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        conv.save_pretrained(str(target))
    assert not target.exists() and not any(p.name.startswith("out.partial") for p in tmp_path.iterdir())


def test_transmla_llama_saves_as_a_stock_deepseek_v3_folder(tmp_path):
    """A converted LLaMA in DeepSeek-V3 form: the latent, one shared RoPE key on the first frequency pairs (theta
    remapped), the constant latent channel for kv_a_layernorm; the fresh process never imports rewrite."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    model = M.llama(kv_heads=2)
    calibration = [{"input_ids": M.ids(1, 16, s)} for s in (1, 2)]
    conv = rewrite.convert(model, "mla{kv_rank=24,rope_dims=8,method=transmla}", example_inputs={"input_ids": M.ids(2, 8)},
                           calibration=calibration, progress=False)
    folder = str(tmp_path / "ds")
    info = conv.save_pretrained(folder)
    assert info["kind"] == "stock", info["reason"]
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["model_type"] == "deepseek_v3" and cfg["q_lora_rank"] is None and not cfg["rope_interleave"]
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"],
            cfg["first_k_dense_replace"], cfg["num_attention_heads"]) == (24 + 1, 8, 8 + 4, 16, 2, 4)  # nope: the 4
    # pairs outside the shared key and the rest of its 2 lower-frequency pairs
    # DeepSeek's RoPE over 8 dims with theta^(8/16) has the source's first 4 of 8 frequencies
    ds = DeepseekV3RotaryEmbedding(DeepseekV3Config.from_dict(cfg)).inv_freq
    torch.testing.assert_close(ds, LlamaRotaryEmbedding(model.config).inv_freq[:4], rtol=1e-6, atol=0)
    ids, mask = M.left_padded_prompt(9, 3, batch=3)
    with torch.no_grad():  # left padding: the padded positions' logits are no one's to compare
        again = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask).logits
        ref = conv.hf_model()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert float((again - ref)[real].abs().max()) <= 1e-4 * float(ref[real].abs().max())
    mask = torch.ones_like(mask)  # the fresh process: every position's logits, and greedy tokens
    expect = _expect(conv, folder, ids, mask)
    r = _fresh("block", [folder])[folder]
    assert r["class"] == "DeepseekV3ForCausalLM" and r["tokens"], r
    assert r["err"] <= 1e-4 * float(expect["logits"].abs().max()), r  # the constant channel's norm error, fp32


def test_what_deepseek_v3_cannot_hold_is_named(tmp_path):
    """Outside the DeepSeek-V3 form the reason is named and the custom-code folder (latent site specs) is written;
    it reloads in process with the converted model's logits."""
    import re

    import transformers

    calibration = [{"input_ids": M.ids(1, 16, s)} for s in (1, 2)]
    for factory, why in ((M.gemma, r"model\.layers\.0\.input_layernorm is not an RMSNorm w·x/rms\(x\) with eps="),
                         (M.qwen2, r"the DeepSeek-V3 form cannot hold a query bias \(DeepSeek's q_proj has none\)")):
        conv = rewrite.convert(factory(), "mla{kv_rank=24,rope_dims=8,method=transmla}",
                               example_inputs={"input_ids": M.ids(2, 8)},
                               calibration=calibration, progress=False)
        folder = str(tmp_path / factory.__name__)
        info = conv.save_pretrained(folder)
        assert info["kind"] == "custom" and re.search(why, info["reason"]), info
        again = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = M.ids(3, 11, seed=7)
        with torch.no_grad():
            a, b = again(input_ids=ids).logits, conv(input_ids=ids).logits
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
