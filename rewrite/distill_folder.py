"""Distill a converted Hugging Face folder (a streamed conversion's output) from its original folder:

    min_θ  E_batch  L(teacher(batch), student_θ(batch)),   θ = the student's parameters that the teacher lacks
                                                             or holds with another shape or value

Neither model is captured or held twice: both load with ``from_pretrained(low_cpu_mem_usage=True,
device_map=...)`` (the student's custom code, if any, with ``trust_remote_code``), the teacher frozen. The loop is
``rewrite.distill``'s (``distill.train``: KL on logits over the kept tokens, held-out evaluation with the best
parameters kept, data-parallel under ``accelerate launch``). The student is written with ``save_pretrained`` into
``OUT.partial``, its other files (tokenizer, generation config) copied, then renamed to ``OUT`` with the
completion mark, as a streamed conversion is.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import torch

from .errors import RewriteError
from .shards import Checkpoint, publish, side_files


def distill_folder(student_dir: str, teacher_dir: str, data: list, out_dir: str, steps: int = 100,
                   lr: float = 1e-4, loss: str = "auto", dtype: str = "fp32", device_map: Optional[str] = None,
                   eval_data: Optional[list] = None, eval_every: int = 25, patience: int = 0,
                   progress: bool = True) -> dict:
    """Train the converted folder ``student_dir`` to reproduce ``teacher_dir`` on ``data`` (batches of
    ``input_ids`` / ``attention_mask``) and write it to ``out_dir``.

    ``dtype``: the precision the models train in ("fp32", or "bf16" to halve their memory); the output keeps the
    student folder's dtype. ``device_map``: passed to ``from_pretrained`` ("auto" spreads a model over the GPUs
    and CPU memory; None: the CPU). Returns what goes into ``OUT/rewrite-distill.json``: the losses of every step,
    the held-out losses, the trained parameter count, seconds and peak RSS.
    """
    from .distill import train
    from .stream import _dtype
    from .stream_calib import peak_rss

    if not data:
        raise RewriteError("distill needs at least one batch of data")
    if os.path.abspath(out_dir) in (os.path.abspath(student_dir), os.path.abspath(teacher_dir)):
        raise RewriteError(f"distill: --save {out_dir} would overwrite an input folder; give a new folder")
    config = Checkpoint(student_dir).config
    Checkpoint(teacher_dir)  # refuses an unfinished conversion
    stored = config.get("dtype") or config.get("torch_dtype")
    compute = _dtype(dtype)
    t0 = time.perf_counter()
    teacher = _load(teacher_dir, compute, device_map, remote_code=False)
    student = _load(student_dir, compute, device_map, remote_code=True)
    trained = changed_parameters(student, teacher)
    if not trained:
        raise RewriteError(f"distill: every parameter of {student_dir} equals the one of the same name in "
                           f"{teacher_dir}: nothing was converted to distill. Give the converted folder as the "
                           "student and the folder it was converted from as --teacher")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    device = student.get_input_embeddings().weight.device
    moved = [{k: v.to(device) for k, v in b.items()} for b in data]
    held_out = [{k: v.to(device) for k, v in b.items()} for b in (eval_data or [])]
    track = None
    if progress:
        from .api import _progress

        track = _progress()
    extras = {}
    losses, evals, best, trained = train(student, teacher, moved, trained, steps, lr, loss, held_out, eval_every,
                                         patience, track, extras)
    result = {"student": student_dir, "teacher": teacher_dir, "steps_run": len(losses), "losses": losses,
              "held_out": evals, "best_step": best[0] if best else None,
              "trained_params": sum(p.numel() for p in trained),
              "trained_tensors": len(trained), "seconds": time.perf_counter() - t0,
              "peak_rss_bytes": peak_rss(), **extras}
    if int(os.environ.get("RANK", "0")) == 0:  # one of several data-parallel processes: rank 0 writes
        _write(student, student_dir, out_dir, stored, result)
    return result


def changed_parameters(student, teacher) -> list:
    """The student's parameters that the teacher has not under the same name, shape and value."""
    ref = dict(teacher.named_parameters())
    out = []
    for name, p in student.named_parameters():
        t = ref.get(name)
        if t is None or t.shape != p.shape or not torch.equal(t.detach().to(p.device), p.detach()):
            out.append(p)
    return out


def _load(folder: str, dtype: torch.dtype, device_map, remote_code: bool):
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, low_cpu_mem_usage=True, device_map=device_map, trust_remote_code=remote_code)
    except Exception as e:  # noqa: BLE001
        raise RewriteError(f"distill: could not load {folder} with from_pretrained: {e}") from e
    return model.eval()


def _write(student, student_dir: str, out_dir: str, stored, result: dict) -> None:
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if stored in ("bfloat16", "float16"):
        student.to(getattr(torch, stored))
    student.save_pretrained(tmp)
    for name in side_files(student_dir):  # tokenizer, generation config: what save_pretrained did not write
        if not os.path.exists(os.path.join(tmp, name)):
            shutil.copy2(os.path.join(student_dir, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "rewrite-distill.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    publish(tmp, out_dir, {"distilled_from": result["teacher"], "student": result["student"]})
