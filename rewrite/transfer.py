"""Attention transfer: train each changed site on its own to reproduce the original site (LoLCATs' first stage).

    min_θ  Σ_ℓ Σ_batch ‖op'_ℓ(a_ℓ) − op_ℓ(a_ℓ)‖² / ‖op_ℓ(a_ℓ)‖²,   a_ℓ = the inputs site ℓ received in the original

Every site sees the *original* model's inputs (recorded once on the captured graph), so the sites train
independently and no gradient crosses layers: cheap, and what a linear-attention feature map needs before
end-to-end distillation (``rewrite.distill``) fine-tunes the whole. θ are the parameters of the sites the
passes changed (``distill.trainable_parameters``).
"""
from __future__ import annotations

import torch

from .calibrate import record_site_inputs
from .errors import RewriteError
from .graph import sites

__all__ = ["attention_transfer"]


def attention_transfer(student, batches: list, steps: int, lr: float = 1e-3, chosen=None, track=None) -> list:
    """Train the changed sites of ``student`` (a ``rewrite.Converted``) for ``steps`` Adam steps on the inputs
    the captured original's sites received on ``batches`` (kwargs dicts); returns the loss of every step."""
    from .distill import trainable_parameters

    before, after = sites(student._captured.gm), sites(student.gm)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a is not b]
    if not changed:
        raise RewriteError("attention transfer: no site was changed by the passes")
    captured = student._captured.gm
    records = record_site_inputs(captured, lambda kw: captured(**kw, **student.fixed), batches)
    with torch.no_grad():
        targets = [[before[i](*r.args) for r in records[i]] for i in range(len(before))]
    chosen = trainable_parameters(student) if chosen is None else chosen
    optimizer = torch.optim.Adam(chosen, lr=lr)
    losses = []
    steps_iter = track(range(steps), "attention transfer") if track else range(steps)
    for step in steps_iter:
        b = step % len(batches)
        loss = sum(((after[i](*records[i][b].args) - targets[i][b]).pow(2).sum() / targets[i][b].pow(2).sum()
                    .clamp_min(1e-30)) for i in changed) / len(changed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
