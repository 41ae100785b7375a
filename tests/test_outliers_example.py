"""examples/outliers.py --quick: three variants trained, measured, exported to ONNX and quantized to INT8.

Only deterministic facts are asserted: the rows, finite values, the quantized models run and give the
fp32 models' output shapes.
"""
import importlib.util
import math
import os
import sys

import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("outliers_example", os.path.join(ROOT, "examples", "outliers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_gives_three_finite_rows_and_runnable_int8_models(tmp_path, capsys):
    rows = _example().main(["--quick", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["vanilla", "clipped-softmax", "gated-attention"]
    assert [r["pipeline"] for r in rows] == ["(none)", "clipped-softmax{alpha=4.0}", "gated-attention"]
    numbers = ("loss", "copy_acc", "max_inf_norm", "max_attn_out", "kurtosis", "int8_loss", "int8_max_err",
               "int8_mean_err")
    for r in rows:
        assert all(math.isfinite(r[k]) for k in numbers), r
        assert r["int8_shapes_match"] and r["int8_outputs"] == 2  # logits and the residual stream
        int8 = onnx.load(str(tmp_path / f"{r['variant']}.int8.onnx"))
        assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    # the gate adds D + H parameters per layer: 2 × (64 + 4)
    assert rows[2]["params"] - rows[0]["params"] == 2 * (64 + 4) and rows[1]["params"] == rows[0]["params"]
    assert (tmp_path / "outliers.json").exists()
    printed = capsys.readouterr().out
    assert "max ‖x‖∞" in printed and "gated-attention" in printed
