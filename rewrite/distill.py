"""Distill a converted model from the original: train what the passes changed to match the teacher.

    min_θ  E_batch  L(student_θ(batch), teacher(batch))

L is KL(softmax(teacher logits) ‖ softmax(student logits)) for models whose output has ``.logits``,
else the mean squared error of ``last_hidden_state`` (or the first tensor output), over the tokens
the batch's ``attention_mask`` keeps. θ are, by default, the parameters of every site whose op
differs from the captured stage (its weights, score_fn, head_gate, shared atoms); ``params="all"``
trains every parameter of the student. The teacher and the captured stage are never modified: a trainable
parameter that shares memory with either is replaced by its own copy first.

``lora=r``: peft LoRA adapters of rank r on the untouched Linear layers (``rewrite.lora``: MLPs and other
projections outside the attention sites) train too, and are merged into their weights at the end, so the result
is a plain converted model again.

``transfer_steps``: first train each changed site alone on the original's site inputs (``rewrite.transfer``).
``eval_data``: held-out batches whose loss is measured before training and every ``eval_every`` steps; the best
parameters are kept (restored at the end) and training stops after ``patience`` evaluations without a new best
(0: never).

Launched by ``accelerate launch --multi_gpu --num_processes N`` (or any launcher that sets ``WORLD_SIZE`` > 1, such
as torchrun; on the CPU when there is no GPU) the same call trains data-parallel: ``Accelerator.prepare`` wraps
the student in DistributedDataParallel and every process takes its contiguous 1/N of each batch's rows. Each
divides its slice's summed token loss by the mean kept-token count over the processes, so the gradient DDP
averages is the one a single process gets on the whole batch (to round-off), however the padding falls. The
returned losses are averaged over the processes.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import types
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .capture import normalize_inputs
from .errors import RewriteError
from .graph import sites

__all__ = ["distill", "trainable_parameters"]

EVAL_BATCHES = 8  # the distill stage's max_abs_err and cosine are measured on the first batches of the data


def trainable_parameters(student, params: str = "changed") -> list:
    """The student's parameters to train: those of sites changed since capture, or all of them."""
    if params == "all":
        return list(student.gm.parameters())
    if params != "changed":
        raise RewriteError(f"distill: params must be 'changed' or 'all', got {params!r}")
    before = sites(student._captured.gm)
    out, seen = [], set()
    for i, op in enumerate(sites(student.gm)):
        if i < len(before) and op is before[i]:
            continue
        for p in op.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _untie_from(student, teacher: nn.Module, chosen: list) -> list:
    """Give every chosen parameter that shares memory with the teacher or with the captured graph a copy of its
    own (ties kept): passes that attach a part to a shallow copy of a site (moh, gated attention, clipped softmax)
    share its weights with the captured stage, which every later ``restage`` starts from."""
    kept = [teacher, student._captured.gm]
    teacher_ptrs = {t.data_ptr() for m in kept for t in list(m.parameters()) + list(m.buffers())}
    copies = {id(p): nn.Parameter(p.detach().clone()) for p in chosen if p.data_ptr() in teacher_ptrs}
    if not copies:
        return chosen
    for module in student.gm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in copies:
                module._parameters[name] = copies[id(p)]
    return [copies.get(id(p), p) for p in chosen]


def _main_tensor(out):
    """logits / last_hidden_state / first floating tensor of a model output."""
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return key, t
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            return "output", t
    raise RewriteError("distill: the model output holds no floating tensor to match")


def _token_weights(batch: dict, like: torch.Tensor) -> Optional[torch.Tensor]:
    m = batch.get("attention_mask")
    if isinstance(m, torch.Tensor) and m.dim() == 2 and tuple(m.shape) == tuple(like.shape[:2]):
        return m.to(like.dtype)
    return None


def _loss(kind: str, s_out, t_out, batch: dict) -> torch.Tensor:
    total, count = _loss_terms(kind, s_out, t_out, batch)
    return total / count


def _loss_terms(kind: str, s_out, t_out, batch: dict) -> tuple:
    """(the per-token loss summed over the kept tokens, their number): the mean is total / count."""
    key, t = _main_tensor(t_out)
    s = getattr(s_out, key) if key != "output" else _main_tensor(s_out)[1]
    s = s.reshape(t.shape)
    if kind == "auto":
        kind = "kl" if key == "logits" else "mse"
    w = _token_weights(batch, t)
    if kind == "kl":
        per = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                       reduction="none").sum(-1)  # per token
    elif kind == "mse":
        per = (s.float() - t.float()).pow(2).mean(-1)
    else:
        raise RewriteError(f"distill: loss must be 'auto', 'kl' or 'mse', got {kind!r}")
    if w is not None and per.dim() >= 2:
        return (per * w).sum(), w.sum().clamp_min(1.0)
    return per.sum(), torch.tensor(float(per.numel()))


def distill(student, teacher: nn.Module, data, steps: int = 100, lr: float = 1e-4, params: str = "changed",
            loss: str = "auto", progress: bool = True, eval_data=None, eval_every: int = 25, patience: int = 0,
            transfer_steps: int = 0, transfer_lr: Optional[float] = None, lora: int = 0,
            lora_alpha: Optional[float] = None) -> list:
    """Train ``student`` (a ``rewrite.Converted``) to reproduce ``teacher`` on ``data``.

    Args:
        student: the converted model; trained in place, its report gains a "distill" stage.
        teacher: the original model; never modified.
        data: a list of input batches (kwargs dicts or tuples of args), cycled over the steps.
        steps, lr: Adam steps and learning rate.
        params: "changed" (parameters of the sites the passes changed) or "all".
        loss: "auto" (KL on logits, else MSE on hidden states), "kl" or "mse".
        eval_data, eval_every, patience: held-out batches, how often they are measured, and how many
            evaluations without a new best stop training (0: never); the best parameters are kept.
        transfer_steps, transfer_lr: steps (and learning rate, default ``lr``) of per-site attention transfer
            before the end-to-end steps.
        lora, lora_alpha: rank of peft LoRA adapters on the untouched Linear layers (0: none) and their α
            (default 2·rank); merged into the weights at the end.
    Returns:
        the loss of every step.
    """
    from .api import _progress, _stage
    from .verify import compare_outputs, site_errors

    batches = [_student_inputs(student, normalize_inputs(teacher, b)) for b in data]
    if not batches:
        raise RewriteError("distill needs at least one batch of data")
    if lora and params == "all":
        raise RewriteError("distill: lora adapts the layers that do not train; with params='all' every weight "
                           "trains already. Use params='changed' with lora, or lora=0")
    _snapshot_stages(student, params)
    chosen = _untie_from(student, teacher, trainable_parameters(student, params))
    if not chosen:
        raise RewriteError("distill: no parameters to train (no site was changed by the passes); "
                           "use params='all'")
    flags = {id(p): p.requires_grad for p in student.gm.parameters()}
    adapters = None
    if lora:
        from .lora import attach_lora

        adapters = attach_lora(student, lora, lora_alpha)  # peft leaves only its adapters trainable
    for p in student.gm.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    model = student.gm if adapters is None else adapters.module
    trained = chosen + ([] if adapters is None else adapters.parameters())
    teacher_mode = teacher.training
    teacher.eval()
    held_out = [_student_inputs(student, normalize_inputs(teacher, b)) for b in (eval_data or [])]
    if eval_data is not None and (not held_out or eval_every < 1 or patience < 0):
        raise RewriteError("distill: eval_data needs at least one batch, eval_every >= 1 and patience >= 0")
    t0 = time.perf_counter()
    track = _progress() if progress else None
    if transfer_steps:
        from .transfer import attention_transfer

        student.report.extras["loss (attention transfer)"] = attention_transfer(
            student, batches, transfer_steps, transfer_lr or lr, chosen, track)
    try:
        losses, evals, best, trained = train(model, teacher, batches, trained, steps, lr, loss, held_out, eval_every,
                                             patience, track, student.report.extras, student.fixed)
    finally:
        for p in student.gm.parameters():
            p.requires_grad_(flags.get(id(p), True))
        teacher.train(teacher_mode)
    merge_err = None
    if adapters is not None:  # fold B A into the weights; the merged model must compute what the adapters did
        with torch.no_grad():
            unmerged = _main_tensor(model(**batches[0], **student.fixed))[1]
            adapters.merge()
            merge_err = float((_main_tensor(student.gm(**batches[0], **student.fixed))[1] - unmerged).abs().max())
    seconds = time.perf_counter() - t0
    call_teacher = (lambda kw: teacher(**kw, **student.fixed))
    call_student = (lambda kw: student.gm(**kw, **student.fixed))
    with torch.no_grad():
        cmp = compare_outputs(call_teacher, call_student, batches[:EVAL_BATCHES])
        captured = student._captured.gm
        errs = site_errors(captured, lambda kw: captured(**kw, **student.fixed), student.gm, batches[:1])
    dtype_bytes = next(iter(teacher.parameters())).element_size()
    changed = sum(1 for a, b in zip(sites(captured), sites(student.gm)) if a is not b)
    spec = f"distill{{steps={steps},lr={lr:g},params={params},loss={loss}" + (f",lora={lora}}}" if lora else "}")
    stats = {"trained_params": sum(p.numel() for p in trained), "first_loss": losses[0], "last_loss": losses[-1]}
    if adapters is not None:
        stats.update(lora_rank=lora, lora_params=sum(p.numel() for p in adapters.parameters()),
                     lora_layers=len(adapters.names), lora_merge_max_abs_err=merge_err)
    if best is not None:
        stats.update(best_step=best[0], best_held_out_loss=best[1], steps_run=len(losses))
        student.report.extras["loss (distill, held-out)"] = evals
    student.report.stages.append(_stage("distill", spec, False, student.gm, changed, seconds, cmp, errs, dtype_bytes,
                                        stats=stats))
    student.report.extras["loss (distill)"] = losses
    graphs = student.__dict__.get("_stage_graphs")
    if graphs is not None:
        graphs.append(student.gm)
    return losses


def train(model: nn.Module, teacher: nn.Module, batches: list, trained: list, steps: int, lr: float, loss: str,
          held_out: list, eval_every: int, patience: int, track, extras: dict, fixed: Optional[dict] = None):
    """Adam on ``trained`` (parameters of ``model``) for ``steps`` steps of L(model(batch), teacher(batch)),
    cycling over ``batches``; data-parallel under a multi-process launch (extras gains "distributed"). With
    ``held_out`` batches: measured before training and every ``eval_every`` steps, stopped after ``patience``
    evaluations without a new best (0: never), the best parameters restored at the end.

    Returns (the loss of every step, {step: held-out loss}, (best step, its loss, its parameters) or None,
    the trained parameters: FSDP replaces them by sharded ones)."""
    fixed = fixed or {}
    optimizer = torch.optim.Adam(trained, lr=lr)
    acc = _accelerator()
    forward, local, backward, mean = model, batches, (lambda v: v.backward()), (lambda v: v)
    tokens = (lambda n: n)  # the batch's kept tokens, from this process's
    if acc is not None:  # data parallel: DDP averages the gradients of every process's slice; FSDP also shards
        forward, optimizer = acc.prepare(model, optimizer)
        local = [_slice(b, acc.process_index, acc.num_processes) for b in batches]
        backward, mean = acc.backward, (lambda v: acc.reduce(v, "mean"))
        tokens = (lambda n: acc.reduce(n.detach().clone(), "sum") / acc.num_processes)
        engine = str(acc.distributed_type).split(".")[-1]
        extras["distributed"] = {"engine": engine, "processes": acc.num_processes}
        if engine == "FSDP":  # fully_shard swapped the parameters for sharded ones: keep the best of those
            trained = [p for p in model.parameters() if p.requires_grad]
    losses, evals, best = [], {}, None
    if held_out:  # step 0 counts: when training only hurts, the converted parameters are kept
        evals[0] = _held_out_loss(model, teacher, held_out, loss, fixed)
        best = (0, evals[0], [p.detach().clone() for p in trained])
    steps_iter = range(steps)
    if track and (acc is None or acc.is_main_process):
        steps_iter = track(steps_iter, "distilling")
    for step in steps_iter:
        batch = local[step % len(local)]
        with torch.no_grad():
            t_out = teacher(**batch, **fixed)
        total, count = _loss_terms(loss, forward(**batch, **fixed), t_out, batch)
        value = total / tokens(count)  # averaged over the processes: the whole batch's mean per token
        optimizer.zero_grad(set_to_none=True)
        backward(value)
        optimizer.step()
        losses.append(float(mean(value.detach())))
        if held_out and ((step + 1) % eval_every == 0 or step + 1 == steps):  # the same on every process
            evals[step + 1] = _held_out_loss(model, teacher, held_out, loss, fixed)
            if best is None or evals[step + 1] < best[1]:
                best = (step + 1, evals[step + 1], [p.detach().clone() for p in trained])
            elif patience and sum(1 for s in evals if s > best[0]) >= patience:
                break
    if best is not None and best[0] != max(evals):
        with torch.no_grad():
            for p, kept in zip(trained, best[2]):
                p.copy_(kept)
    return losses, evals, best, trained


def _held_out_loss(model, teacher, batches: list, loss: str, fixed: dict) -> float:
    with torch.no_grad():
        return sum(float(_loss(loss, model(**b, **fixed), teacher(**b, **fixed), b)) for b in batches) / len(batches)


def _accelerator():
    """An ``accelerate.Accelerator`` when this process is one of several (accelerate launch, torchrun), else None.

    Without a GPU the processes train on the CPU (gloo): ``accelerate launch --multi_gpu --num_processes N`` and
    ``torchrun --nproc_per_node N`` both give DDP over N CPU processes. ``accelerate launch --cpu --num_processes N``
    starts several processes only through MPI (``--mpirun_hostfile``); without it accelerate starts one, which is
    warned about."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _warn_one_cpu_process()
        return None
    from accelerate import Accelerator

    acc = Accelerator(cpu=not _has_accelerator_device())
    if acc.num_processes != world:
        raise RewriteError(f"distill: launched as {world} processes, but accelerate set up "
                           f"{str(acc.distributed_type).split('.')[-1]} training on {acc.num_processes}; each process "
                           "would train alone. Launch data-parallel training with `accelerate launch --multi_gpu "
                           "--num_processes N` (on CPUs too) or `torchrun --nproc_per_node N`")
    engine = str(acc.distributed_type).split(".")[-1]
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and engine != "FSDP":
        warnings.warn(f"distill: FSDP was asked for, but accelerate set up {engine} (it shards only on GPUs and "
                      "similar devices): every process holds the whole student", RuntimeWarning, stacklevel=3)
    return acc


def _has_accelerator_device() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def _warn_one_cpu_process() -> None:
    """``accelerate launch --cpu --num_processes N>1`` without MPI runs one process: say so, and how to get N."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            launcher = f.read().decode(errors="replace").split("\0")
    except OSError:
        return
    asked = next((launcher[i + 1] for i, a in enumerate(launcher[:-1]) if a == "--num_processes"), "1")
    if "accelerate" in " ".join(launcher) and asked.isdigit() and int(asked) > 1:
        warnings.warn(f"distill: `accelerate launch --cpu --num_processes {asked}` started one process (accelerate "
                      "starts several CPU processes only through MPI, with --mpirun_hostfile); this one trains on "
                      f"every batch alone. For {asked} CPU processes: `accelerate launch --multi_gpu "
                      f"--num_processes {asked}` (without --cpu; distill trains on the CPU when there is no GPU)",
                      RuntimeWarning, stacklevel=3)


def _slice(batch: dict, rank: int, world: int) -> dict:
    """Process ``rank``'s contiguous 1/``world`` of the batch's rows."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1 or next(iter(sizes)) % world:
        raise RewriteError(f"distill on {world} processes: every batch must hold a multiple of {world} samples "
                           f"(got batch sizes {sorted(sizes)}); give batches of k·{world} samples")
    n = next(iter(sizes)) // world
    return {k: v[rank * n:(rank + 1) * n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in batch.items()}


def _snapshot_stages(student, params: str) -> None:
    """Give the earlier stages' models private copies of the sites about to train, so they stay as they were
    (``rewrite.evaluate`` measures them) while the student keeps its own objects. One memo for all copies:
    weights shared across sites (MASA atoms) stay shared in the snapshot too."""
    graphs = student.__dict__.get("_stage_graphs")
    if not graphs:
        return
    if params == "all":  # every stage shares the weights about to train: their models are no longer kept
        graphs[:] = [None] * len(graphs)
        return
    from .graph import with_sites

    captured = {id(op) for op in sites(student._captured.gm)}  # never trained: only changed sites are
    live = {id(op) for op in sites(student.gm)} - captured
    memo = {}
    for j, g in enumerate(graphs):
        shared = {i: op for i, op in enumerate(sites(g)) if id(op) in live}
        if shared:
            graphs[j] = with_sites(g, {i: copy.deepcopy(op, memo) for i, op in shared.items()})


def _student_inputs(student, kw: dict) -> dict:
    """The batch restricted to the inputs the student was captured with."""
    kw = {k: v for k, v in kw.items() if k in student.input_names}
    missing = [n for n in student.input_names if n not in kw]
    if missing:
        raise RewriteError(f"distill: a batch lacks the inputs {missing} the model was converted with")
    return kw


class _CallableModule(types.ModuleType):
    """``import rewrite.distill`` rebinds ``rewrite.distill`` to this module; keep ``rewrite.distill(...)`` working."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
