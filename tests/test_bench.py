"""``rewrite bench``: rows per backend and length, theoretical ratios from the report, refusals as notes."""
import io

import pytest
import torch
from rich.console import Console

import models
from rewrite.bench import BenchTable, bench, inputs_at
from rewrite.errors import RewriteError
from rewrite.pipeline import available


def _example():
    return (models.ids(2, 8),)


def test_bench_eager_onnxruntime_triton_rows():
    spec = "sqa{q_heads=2,kv_heads=1}" if "sqa" in available() else ""
    before = torch.get_num_threads()
    table = bench(models.llama(kv_heads=2, layers=1), spec, backends=["eager", "onnxruntime", "triton"],
                  seq_lens=[16, 24], repeats=2, example=_example(), progress=False)
    assert torch.get_num_threads() == before  # restored
    assert isinstance(table, BenchTable) and table.threads == 2
    assert [(r["backend"], r["seq_len"]) for r in table.rows] == [
        (b, s) for s in (16, 24) for b in ("eager", "onnxruntime", "triton")]
    for r in table.rows:
        assert r["original_ms"] > 0
        if r["backend"] == "triton":  # the CPU interpreter (TRITON_INTERPRET=1) is not timed
            assert r["converted_ms"] is None and r["note"].startswith("skipped")
        else:
            assert r["converted_ms"] > 0 and r["speedup"] == pytest.approx(r["original_ms"] / r["converted_ms"])
        if spec:  # 4 -> 2 query heads halves the attention FLOPs; 2 -> 1 KV heads halves the KV cache
            assert r["attn_flop_ratio"] == pytest.approx(2.0) and r["kv_bytes_ratio"] == pytest.approx(2.0)
    out = io.StringIO()
    table.print(Console(file=out, width=160))
    text = out.getvalue()
    assert "rewrite bench" in text and "onnxruntime" in text and "attn FLOP ratio" in text
    assert "| backend | seq_len |" in table.to_markdown()


def test_bench_int8_row_says_lossy():
    table = bench(models.bert(layers=1), "", backends=["onnxruntime-int8"], seq_lens=[16],
                  repeats=1, example=_example(), progress=False)
    (row,) = table.rows
    assert row["backend"] == "onnxruntime-int8" and row["converted_ms"] > 0
    assert row["note"].startswith("lossy: max abs err ") and row["note"].endswith(" vs PyTorch fp32")


def test_inputs_at_resizes_sequence_only():
    import rewrite

    mask = torch.ones(3, 8, dtype=torch.long)
    conv = rewrite.convert(models.bert(), passes="", example_inputs={"input_ids": models.ids(3, 8),
                                                                      "attention_mask": mask}, progress=False)
    kw = inputs_at(conv, 21)
    assert kw["input_ids"].shape == (3, 21) and kw["attention_mask"].shape == (3, 21)
    assert torch.equal(kw["input_ids"][:, 8:16], conv.example_inputs["input_ids"])


def test_bench_refusals():
    with pytest.raises(RewriteError, match="bench needs example inputs"):
        bench(models.bert(), "", example=None)
    with pytest.raises(RewriteError, match=r"unknown backend\(s\) \['tvm'\]"):
        bench(models.bert(), "", backends=["tvm"], example=_example())
