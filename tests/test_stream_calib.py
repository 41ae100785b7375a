"""Calibrated passes streamed layer by layer (rewrite.stream_calib): same weights as rewrite.convert, HF folders
that load and run, resuming after SIGKILL, refusals."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import rewrite
from rewrite.errors import PassError, RewriteError
from rewrite.shards import COMPLETE, JOURNAL
from rewrite.stream import convert_folder
from rewrite.stream_calib import calibration_batches

from models import VOCAB
from test_stream import _llama, _word_tokenizer


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    folder = str(root / "llama")
    _llama().save_pretrained(folder, max_shard_size="200KB")
    _word_tokenizer(folder)
    g = torch.Generator().manual_seed(3)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (int(n),), generator=g))
             for n in torch.randint(5, 13, (20,), generator=g)]  # two padded batches of 16 and 4 lines
    with open(os.path.join(folder, "..", "calibration.txt"), "w") as f:
        f.write("\n".join(lines))
    return folder


def _text(src):
    return os.path.join(src, "..", "calibration.txt")


def _tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.mark.parametrize("spec, kind, sweeps", [
    ("gqa{kv_heads=2,method=aligned}", "stock", 1),
    ("dha{kv_ratio=0.5,budget=uniform}", "custom", 2),  # one head budget for every layer: gathered, decided, applied
    # two calibrated passes: prune-heads reads the hidden states of layers converted by gqa only; taylor-local
    # differentiates each site's own output on its recorded inputs
    ("gqa{kv_heads=2,method=aligned},prune-heads{ratio=0.25,importance=taylor-local}", "custom", 2),
])
def test_streamed_calibration_gives_the_in_memory_weights(src, tmp_path, spec, kind, sweeps):
    out = str(tmp_path / "out")
    report = convert_folder(src, spec, out, calibration_file=_text(src), progress=False)
    ex = report.to_json()["extras"]["streaming"]
    assert ex["mode"].startswith("calibrated, streamed layer by layer") and ex["folder"] == kind
    streams = spec.count("{")  # one stream of hidden states per calibrated pass, two sides each, fp32, width 128
    assert ex["sweeps"] == sweeps and ex["hidden_state_bytes"] == streams * 2 * 4 * ex["calibration_tokens"] * 128
    assert ex["peak_rss_bytes"] > 0 and len(ex["layer_seconds"]) == 3 * sweeps
    calib = calibration_batches(src, _text(src))
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    conv = rewrite.convert(model, spec, example_inputs=calib[0], calibration=calib, progress=False)
    got = _tensors(out)
    for i, op in enumerate(conv.sites):
        for f in ("wq", "wk", "wv", "wo"):
            want = getattr(op, f).detach()
            if kind == "stock":
                v = got[f"model.layers.{i}.self_attn.{f[1]}_proj.weight"]
                want = want.reshape(want.shape[0], -1) if f == "wo" else want.reshape(-1, want.shape[-1])
            else:
                v = got[f"model.layers.{i}.self_attn.op.{f}"]
            assert v.shape == want.shape
            assert (v - want).abs().max() <= 1e-5 * want.abs().max()
    assert report.to_json()["stages"][-1]["kv_heads"] == [op.kv_heads for op in conv.sites]
    with open(os.path.join(out, COMPLETE)) as f:
        assert json.load(f)["pipeline"] == report.pipeline
    assert not os.path.exists(os.path.join(out, JOURNAL)) and not os.path.exists(out + ".partial")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(0, VOCAB - 2, (3, 7), generator=torch.Generator().manual_seed(5))  # unseen batch and length
    mask = torch.ones_like(x)
    with torch.no_grad():
        a, b = again(x, attention_mask=mask).logits, conv(input_ids=x, attention_mask=mask).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    if kind == "custom":
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["model_type"] == "rewrite_llama"


def test_bf16_layer_forwards_give_nearly_the_fp32_conversion(src, tmp_path):
    """compute_dtype=bf16 runs the decoder layers in bf16 (the statistics stay fp32): a conversion close to fp32's."""
    spec = "gqa{kv_heads=2,method=aligned}"
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = str(tmp_path / dtype)
        report = convert_folder(src, spec, out, calibration_file=_text(src), progress=False, compute_dtype=dtype)
        assert report.to_json()["extras"]["streaming"]["compute_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        runs[dtype] = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, VOCAB - 2, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = (runs[d](x, attention_mask=torch.ones_like(x)).logits for d in ("fp32", "bf16"))
    assert 0 < (a - b).abs().max() <= 2e-2 * a.abs().max()  # bf16 hidden states: not equal, close
    with pytest.raises(RewriteError, match=r"compute dtype 'fp16': use fp32 or bf16"):
        convert_folder(src, spec, str(tmp_path / "o"), calibration_file=_text(src), progress=False,
                       compute_dtype="fp16")


def test_sigkill_resumes_at_the_last_completed_layer(src, tmp_path):
    spec = "gqa{kv_heads=2,method=aligned}"
    out = str(tmp_path / "out")
    code = ("import sys; sys.path.insert(0, 'tests'); from rewrite.stream import convert_folder; "
            f"convert_folder({src!r}, {spec!r}, {out!r}, calibration_file={_text(src)!r}, progress=False)")
    env = dict(os.environ, REWRITE_TEST_KILL_AFTER="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")
    with open(os.path.join(out + ".partial", JOURNAL, "journal.json")) as f:
        assert json.load(f)["done"] == 2  # layers 0 and 1 are journaled
    with pytest.raises(RewriteError, match=r"out.partial is an unfinished conversion \(it holds .rewrite-journal/ "
                                           "and no completion mark rewrite-complete.json\\); rerun the same"):
        convert_folder(out + ".partial", "gqa{kv_heads=2}", str(tmp_path / "o2"), progress=False)
    report = convert_folder(src, spec, out, calibration_file=_text(src), progress=False)
    assert report.to_json()["extras"]["streaming"]["resumed_at"] == {"sweep": 1, "layer": 2}
    fresh = str(tmp_path / "fresh")
    convert_folder(src, spec, fresh, calibration_file=_text(src), progress=False)
    a, b = _tensors(out), _tensors(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report.to_json()["stages"][-1]["kv_heads"] == [2, 2, 2]


def test_refusals(src, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setattr("rewrite.stream.available_memory", lambda: 1 << 20)
    with pytest.raises(PassError, match=r"prune-heads needs calibration statistics \('prune-heads\{ratio=0.25\}' "
                                        "cannot stream: importance=taylor differentiates the model's loss through "
                                        "every later layer.*use importance=taylor-local.*GiB are available. Refused"):
        convert_folder(src, "prune-heads{ratio=0.25}", out, calibration_file=_text(src), progress=False)
    with pytest.raises(PassError, match="'masa{refine_rank=2}' cannot stream: masa shares matrix atoms across "
                                        "layers"):
        convert_folder(src, "masa{refine_rank=2}", out, calibration_file=_text(src), progress=False)

    class Full:
        free = 1 << 10

    monkeypatch.setattr("rewrite.stream_calib.shutil.disk_usage", lambda path: Full)
    with pytest.raises(PassError, match=r"the calibration hidden states \(\d+ tokens × 128 wide, fp32, two copies for "
                                        r"each of 1 calibrated pass\(es\)\) need 0.00 GiB; 0.00 GiB of disk at .* and "
                                        "0.00 GiB of RAM are free. Refused: give fewer or shorter calibration"):
        convert_folder(src, "gqa{kv_heads=2,method=aligned}", out, calibration_file=_text(src), progress=False)
    assert not os.path.exists(out)
    shutil.rmtree(out + ".partial", ignore_errors=True)


def _kl(student_dir, teacher, batch):
    import torch.nn.functional as F

    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        s, t = (m(**batch).logits for m in (student, teacher))
    per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return float((per * batch["attention_mask"]).sum() / batch["attention_mask"].sum())


def test_a_streamed_folder_distills_from_its_original(src, tmp_path):
    """`rewrite distill OUT --teacher SRC`: both folders loaded with from_pretrained (the student's custom code
    too), only the converted attention trains, the written folder loads and is closer to the teacher."""
    import hashlib

    from rewrite.cli import main

    out, dist = str(tmp_path / "out"), str(tmp_path / "dist")
    convert_folder(src, "gqa{kv_heads=2,method=aligned},prune-heads{ratio=0.25,importance=taylor-local}", out,
                   calibration_file=_text(src), progress=False)
    before = {f: hashlib.sha256(open(os.path.join(src, f), "rb").read()).hexdigest() for f in os.listdir(src)}
    assert main(["distill", out, "--teacher", src, "--calibration", _text(src), "--calibration-batch", "8",
                 "--calibration-length", "16", "--steps", "15", "--lr", "1e-3", "--save", dist,
                 "--json", str(tmp_path / "d.json")]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["trained_tensors"] == 12  # q, k, v, o of 3 layers: embeddings, norms and MLPs equal the teacher's
    assert len(result["losses"]) == 15 and result["losses"][-1] < 0.5 * result["losses"][0]
    assert os.path.isfile(os.path.join(dist, COMPLETE)) and not os.path.exists(dist + ".partial")
    assert {"modeling_rewrite.py", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(dist))
    teacher = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    batch = calibration_batches(src, _text(src), 4, 16)[-1]  # the last 4 lines: a batch size not trained on
    assert _kl(dist, teacher, batch) < 0.5 * _kl(out, teacher, batch)
    got = transformers.AutoModelForCausalLM.from_pretrained(dist, trust_remote_code=True)
    assert type(got).__name__ == "RewriteLlamaForCausalLM"
    assert torch.equal(got.model.layers[1].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    half = transformers.AutoModelForCausalLM.from_pretrained(dist, trust_remote_code=True, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # the custom sites too
    with torch.no_grad():
        assert half(**batch).logits.dtype == torch.bfloat16
    assert before == {f: hashlib.sha256(open(os.path.join(src, f), "rb").read()).hexdigest() for f in os.listdir(src)}


def test_distilling_a_folder_refuses_what_it_cannot_train(src, tmp_path, capsys):
    import re

    from rewrite.cli import main
    from rewrite.distill_folder import distill_folder

    data = calibration_batches(src, _text(src), 8, 16)
    with pytest.raises(RewriteError, match=r"every parameter of .* equals the one of the same name in .*: nothing "
                                           r"was converted to distill\. Give the converted folder as the student"):
        distill_folder(src, src, data, str(tmp_path / "d"), steps=1, progress=False)
    with pytest.raises(RewriteError, match=r"would overwrite an input folder"):
        distill_folder(src, src, data, src, steps=1, progress=False)
    assert main(["distill", src, "--teacher", src, "--passes", "gqa{kv_heads=2}", "--calibration", _text(src)]) == 2
    assert main(["distill", src, "--teacher", src, "--calibration", _text(src)]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert re.search(r"distill: give --passes SPEC .* or --teacher FOLDER", printed)
    assert "distill --teacher: name the output folder with --save OUT" in printed
    assert not os.path.exists(tmp_path / "d")
