"""The rewrite CLI on the bundled default model and on a package.module:factory model."""
from rewrite.cli import main


def test_inspect_demo_lists_six_sites(capsys):
    assert main(["inspect", "demo"]) == 0
    out = capsys.readouterr().out
    assert "6 sites" in out
    assert out.count("encoder.layer.") == 6


def test_convert_factory_model_writes_reports(tmp_path, capsys):
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    code = main(["convert", "models:NanoGPT", "--passes", "", "--report", str(html), "--markdown", str(md)])
    assert code == 0
    assert html.read_text().startswith("<!doctype html>")
    assert "| captured | yes | 0 |" in md.read_text()


def test_convert_exports_causal_chunks(tmp_path, capsys):
    """NanoGPT's two causal sites (mask from a buffer) as 3 query chunks each, checked in ONNX Runtime."""
    import json

    from rewrite.backends.onnx import onnx_summary

    path, md = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main(["convert", "models:NanoGPT", "--passes", "", "--onnx", str(path), "--causal-chunks", "3",
                 "--json", str(md)])
    assert code == 0 and onnx_summary(str(path))["attention_nodes"] == 6
    assert "6 Attention nodes (4 q / 4 kv heads), opset 23; checked in ONNX Runtime" in capsys.readouterr().out
    onnx = json.loads(md.read_text())["extras"]["onnx"]
    assert onnx["causal_chunks"] == 3 and onnx["max_abs_err"] <= 1e-4


def test_bad_model_spec_is_a_clear_error(capsys):
    assert main(["inspect", "no_such_module:factory"]) == 2
    assert "cannot import 'no_such_module:factory'" in capsys.readouterr().out


def test_folder_without_config(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "without config.json" in capsys.readouterr().out


def test_unknown_pass_in_cli(capsys):
    assert main(["convert", "models:NanoGPT", "--passes", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().out


def test_convert_writes_a_hugging_face_folder(tmp_path, capsys):
    """``--out`` without ``--stream``: the in-memory conversion saved with save_pretrained (stock here)."""
    import json

    out = tmp_path / "hf"
    assert main(["convert", "models:llama", "--passes", "gqa{kv_heads=2}", "--out", str(out)]) == 0
    assert "a stock folder: from_pretrained loads it without rewrite" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def test_decode_bench_refuses_a_model_that_cannot_generate(capsys):
    assert main(["bench", "models:bert", "--decode", "--contexts", "8"]) == 2
    assert "bench --decode needs a causal language model" in capsys.readouterr().out
