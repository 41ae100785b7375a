"""Language-model fidelity of a conversion: perplexity and bits per byte of the original and of every stage.

For texts t_1..t_N tokenized to ids x (with the tokenizer's own BOS/EOS), every token after the first is
predicted from the ones before it, in windows of at most ``window`` predictions:

    NLL = Σ_text Σ_i −log p(x_i | x_<i)          (nats; padding never counted)
    perplexity = exp(NLL / predicted tokens)      bits per byte = NLL / ln 2 / UTF-8 bytes of the texts

Per-site error: on the first batch, each stage's op is run on the inputs the original's site received, and
the relative error ‖y − y₀‖ / ‖y₀‖ of its output is recorded (0 for an unchanged site).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .errors import EvaluationError
from .graph import sites

__all__ = ["evaluate", "Evaluation", "StageEval", "tokenize_texts", "require_language_model"]


@dataclasses.dataclass
class StageEval:
    """One model's figures on the evaluation text."""

    name: str
    nll: float  # mean nats per predicted token
    perplexity: float
    bits_per_byte: Optional[float]  # None when the byte count is unknown (pre-tokenized input)
    site_errors: list = dataclasses.field(default_factory=list)  # relative output error per site vs the original
    index: Optional[int] = None  # position in ``conv.report.stages``; None for the original


@dataclasses.dataclass
class Evaluation:
    """``rewrite.evaluate``'s result: one ``StageEval`` per evaluated model, original first."""

    texts: int
    tokens: int  # predicted tokens
    bytes: Optional[int]
    window: int
    stages: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)  # stages whose model is no longer kept, with why

    def __getitem__(self, name: str) -> StageEval:
        """The last evaluated stage called ``name`` ("original", "captured", a pass name, "distill")."""
        for s in reversed(self.stages):
            if s.name == name:
                return s
        raise KeyError(f"no evaluated stage {name!r}; evaluated: {[s.name for s in self.stages]}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def rich_table(self, title: str = "perplexity"):
        from rich.table import Table

        t = Table(title=f"{title}: {self.texts} texts, {self.tokens:,} predicted tokens")
        for c in ("stage", "perplexity", "bits/byte", "Δ bits/byte", "worst site rel. err"):
            t.add_column(c, justify="left" if c == "stage" else "right")
        base = self.stages[0].bits_per_byte if self.stages else None
        for s in self.stages:
            bpb = "-" if s.bits_per_byte is None else f"{s.bits_per_byte:.4f}"
            delta = "-" if s.bits_per_byte is None or base is None else f"{s.bits_per_byte - base:+.4f}"
            worst = f"{max(s.site_errors):.3g}" if s.site_errors else "-"
            t.add_row(s.name, f"{s.perplexity:.4f}", bpb, delta, worst)
        return t


def _source(conv):
    return conv.__dict__.get("_source")


def _find_tokenizer(conv):
    from .models import tokenizer_for

    cfg = getattr(_source(conv), "config", None)
    folder = getattr(cfg, "_name_or_path", None)
    import os

    return tokenizer_for(folder) if folder and os.path.isdir(folder) else None


def tokenize_texts(texts, tokenizer) -> tuple:
    """(list of 1-D id tensors, UTF-8 byte count or None). Strings need ``tokenizer``; id lists pass through."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise EvaluationError("evaluate got no texts; give a list of strings (or of token-id lists)")
    if all(isinstance(t, str) for t in texts):
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise EvaluationError("evaluate got only empty texts; give text with at least one character")
        if tokenizer is None:
            raise EvaluationError("evaluate needs a tokenizer to turn the texts into ids: pass tokenizer="
                                  "AutoTokenizer.from_pretrained(folder), or give token-id lists instead of strings")
        ids = [torch.as_tensor(tokenizer(t)["input_ids"], dtype=torch.long).flatten() for t in texts]
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    else:
        ids = [torch.as_tensor(t, dtype=torch.long).flatten() for t in texts]
        n_bytes = None
    ids = [x for x in ids if x.numel() >= 2]
    if not ids:
        raise EvaluationError("evaluate: every text is shorter than two tokens, so nothing can be predicted")
    return ids, n_bytes


def _windows(ids: list, window: int) -> list:
    """Cut each text into pieces of at most ``window`` + 1 ids that overlap by one (the predicted-from token)."""
    out = []
    for x in ids:
        for s in range(0, x.numel() - 1, window):
            out.append(x[s:s + window + 1])
    return out


def _batches(pieces: list, batch_size: int, pad_id: int) -> list:
    """Right-padded batches: (input ids [B, S], attention mask [B, S], targets [B, S] with -100 on pads)."""
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].numel())  # similar lengths together
    out = []
    for b in range(0, len(order), batch_size):
        chunk = [pieces[i] for i in order[b:b + batch_size]]
        S = max(p.numel() for p in chunk) - 1
        ids = torch.full((len(chunk), S), pad_id, dtype=torch.long)
        tgt = torch.full((len(chunk), S), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), S), dtype=torch.long)
        for r, p in enumerate(chunk):
            n = p.numel() - 1
            ids[r, :n], tgt[r, :n], mask[r, :n] = p[:-1], p[1:], 1
        out.append((ids, mask, tgt))
    return out


def _logits(out) -> torch.Tensor:
    t = getattr(out, "logits", None)
    if t is None and isinstance(out, dict):
        t = out.get("logits")
    if t is None:
        leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.dtype.is_floating_point]
        t = leaves[0] if leaves else None
    if t is None or t.dim() != 3:
        raise EvaluationError("evaluate: the model gives no [batch, seq, vocab] logits; perplexity needs a causal "
                              "language model (a *ForCausalLM class)")
    return t


def require_language_model(model) -> None:
    """Raise EvaluationError unless ``model`` (a Hugging Face model) can predict the next token."""
    if model is not None and hasattr(model, "can_generate") and not model.can_generate():
        raise EvaluationError(f"perplexity needs a causal language model; {type(model).__name__} is encoder-only or "
                              "has no language-model head. Convert its *ForCausalLM class instead")


def _check_causal(conv) -> None:
    require_language_model(_source(conv))
    bidirectional = [op.info.name for op in sites(conv.gm)
                     if not op.info.cross and not (op.causal or op.info.causal_mask)]
    if bidirectional:
        raise EvaluationError(f"perplexity needs causal attention, but {bidirectional[0]} (and "
                              f"{len(bidirectional) - 1} more) attends to later tokens: the model is encoder-only. "
                              "Judge it with rewrite.distill's hidden-state error or a task metric instead")


def _stage_models(conv) -> tuple:
    """[(index, stage name, graph module)] for the stages whose models are kept, and [(name, why)] for the rest."""
    names = [s.name for s in conv.report.stages]
    graphs = conv.__dict__.get("_stage_graphs")
    if graphs is not None and len(graphs) == len(names):
        kept = [(i, n, g) for i, (n, g) in enumerate(zip(names, graphs)) if g is not None]
        gone = [(n, "distill{params=all} trained the weights its model shared") for n, g in zip(names, graphs)
                if g is None]
        return kept, gone
    kept = [(0, names[0], conv._captured.gm)] if names else []
    if len(names) > 1:
        kept.append((len(names) - 1, names[-1], conv.gm))
    return kept, [(n, "its model is not kept") for n in names[1:-1]]


def _nll(call, batches, input_names, track, description) -> tuple:
    """(sum of nats, predicted tokens) of one model over the batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, tgt in track(batches, description):
            kw = {"input_ids": ids}
            if "attention_mask" in input_names:
                kw["attention_mask"] = mask
            logits = _logits(call(kw)).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((tgt != -100).sum())
    return total, count


def _site_rel_errors(conv, gm, batch) -> list:
    from .verify import _record_site_inputs

    ids, mask, _ = batch
    kw = {"input_ids": ids, **({"attention_mask": mask} if "attention_mask" in conv.input_names else {})}
    ref = conv._captured.gm
    ref_ops, new_ops = sites(ref), sites(gm)
    if len(ref_ops) != len(new_ops):
        return []
    errs = [0.0] * len(new_ops)
    with torch.no_grad():
        for i, args, out in _record_site_inputs(ref, lambda k: ref(**k, **conv.fixed), kw):
            if new_ops[i] is ref_ops[i]:
                continue
            y = new_ops[i](*args)
            errs[i] = float((y.double() - out.double()).norm() / out.double().norm().clamp_min(1e-30))
    return errs


def evaluate(conv, texts, tokenizer=None, window: Optional[int] = None, batch_size: int = 8,
             stages=None, original: bool = True, progress: bool = True,
             into_report: bool = True) -> Evaluation:
    """Perplexity and bits per byte of the original and of each stage of ``conv`` on ``texts``.

    Args:
        conv: a ``rewrite.Converted`` causal language model.
        texts: strings (tokenized with ``tokenizer``, or the tokenizer saved beside the original model) or lists
            of token ids.
        window: most tokens predicted per forward pass; longer texts are cut into windows. Default: the
            config's ``max_position_embeddings`` (at most 1024).
        batch_size: windows per forward pass (right-padded; padding is never counted).
        stages: names of the stages to evaluate (default all kept); ``original``: also the source model.
        into_report: record the result in ``conv.report`` (``extras["evaluation"]``, stage columns, a plot).
    Returns:
        an ``Evaluation`` with one ``StageEval`` per model, original first.
    """
    from .api import _progress

    _check_causal(conv)
    src = _source(conv)
    cfg = getattr(src, "config", None)
    if tokenizer is None and any(isinstance(t, str) for t in ([texts] if isinstance(texts, str) else texts)):
        tokenizer = _find_tokenizer(conv)
    ids, n_bytes = tokenize_texts(texts, tokenizer)
    if window is None:
        window = min(int(getattr(cfg, "max_position_embeddings", 0) or 1024), 1024)
    if window < 1 or batch_size < 1:
        raise EvaluationError(f"evaluate: window ({window}) and batch_size ({batch_size}) must be at least 1")
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    batches = _batches(_windows(ids, window), batch_size, pad)
    track = _progress() if progress else (lambda it, _d: it)
    models = []
    if original and src is not None:
        models.append((None, "original", lambda kw: src(**kw, **conv.fixed), None))
    kept, skipped = _stage_models(conv)
    wanted = None if stages is None else set([stages] if isinstance(stages, str) else stages)
    for index, name, gm in kept:
        if wanted is None or name in wanted:
            models.append((index, name, (lambda g: lambda kw: g(**kw, **conv.fixed))(gm), gm))
    result = Evaluation(texts=len(ids), tokens=0, bytes=n_bytes, window=window,
                        skipped=[f"{n}: {why}" for n, why in skipped if wanted is None or n in wanted])
    for index, name, call, gm in models:
        total, count = _nll(call, batches, conv.input_names, track, f"evaluating {name}")
        result.tokens = count
        bpb = total / math.log(2) / n_bytes if n_bytes else None
        errs = _site_rel_errors(conv, gm, batches[0]) if gm is not None else []
        result.stages.append(StageEval(name, total / count, math.exp(total / count), bpb, errs, index))
    if into_report:
        record(conv.report, result)
    return result


def record(report, result: Evaluation) -> None:
    """Put ``result`` into ``report``: ``extras["evaluation"]`` and each stage's perplexity / bits per byte."""
    report.extras["evaluation"] = result.to_json()
    for ev in result.stages:
        if ev.index is not None and ev.index < len(report.stages):
            report.stages[ev.index].perplexity = ev.perplexity
            report.stages[ev.index].bits_per_byte = ev.bits_per_byte


class _CallableModule(types.ModuleType):
    """``import rewrite.evaluate`` rebinds ``rewrite.evaluate`` to this module; keep ``rewrite.evaluate(...)``."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
