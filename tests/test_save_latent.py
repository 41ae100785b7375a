"""conv.save_pretrained of multi-head latent attention that the DeepSeek-V3 form cannot express (issue 14): a
custom-code folder whose site specs hold the latent form, reloading in a fresh process with the same logits and
greedy tokens."""
from __future__ import annotations

import json
import os

import torch

import models as M
import rewrite
from test_save_pretrained import _expect, _fresh  # the fresh-process reload check shared with the other passes


def test_mla_conversion_writes_a_custom_folder_that_reloads_exactly(tmp_path):
    calibration = [{"input_ids": M.ids(1, 16, s), "attention_mask": torch.ones(1, 16, dtype=torch.long)} for s in (1, 2)]
    torch.manual_seed(0)
    conv = rewrite.convert(M.llama(kv_heads=2), "mla{kv_rank=24,rope_dims=8}", progress=False, calibration=calibration,
                           example_inputs={"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    folder = str(tmp_path / "mla")
    info = conv.save_pretrained(folder)
    assert info["kind"] == "custom", info
    assert ("the DeepSeek-V3 form cannot hold 2 RoPE key heads (mha2mla keeps one per KV head); DeepSeek-V3 has one "
            "shared RoPE key: use mla{method=transmla}") in info["reason"], info
    sites = json.load(open(os.path.join(folder, "config.json")))["rewrite"]["sites"]
    assert len(sites) == 2 and all(s["op"]["latent"] for s in sites)
    op = conv.sites[0]
    spec = sites[0]["op"]
    assert spec["shapes"]["w_dkv"] == [24, 64] and spec["shapes"]["w_kr"] == [2, 8, 64] and spec["rope_map"] == [0, 0, 1, 1]
    assert spec["k_rope"]["partial"] == {"index": op.k_rope.index.tolist(), "head_dim": 16}  # the kept RoPE dims
    ids = M.ids(3, 9, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    _expect(conv, folder, ids, mask)
    result = _fresh("trust", [folder])[folder]
    assert result["class"] == "RewriteLlamaForCausalLM" and result["err"] == 0.0 and result["tokens"], result
