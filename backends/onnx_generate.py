"""Greedy decoding in ONNX Runtime from a folder written by ``export_decoder`` (``rewrite.load_onnx_decoder``).

    prompt:  logits, present = model.onnx(ids, mask, position_ids = cumsum(mask) − 1 (0 at padding), empty past)
    step t:  next = argmax logits[:, −1];  model.onnx(next, mask ++ 1, last position + 1, present)

as transformers' greedy ``generate``: left padding through ``attention_mask`` (inferred from the pad token when
none is given and pad ≠ eos, as transformers does), sequences that emitted an eos token continue with the pad
token (the first eos when no pad token is set), decoding stops when every sequence has finished or after
``max_new_tokens`` (default: the saved generation config's ``max_new_tokens``, else ``max_length`` − prompt).
Logits processors of the generation config (repetition penalty, n-gram bans, ...) are not applied: greedy only.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from rewrite.hf_adapter import GenerationError

__all__ = ["OnnxDecoder", "load_onnx_decoder"]


def _eos_list(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class OnnxDecoder:
    """An exported decoder folder in an ONNX Runtime session: ``step`` (one graph call) and ``generate``."""

    def __init__(self, folder: str, provider: str = "CPUExecutionProvider", threads: Optional[int] = None):
        from .onnx_decoder import LAYOUT_FILE, MODEL_FILE
        from .ort_session import make_session

        layout = os.path.join(folder, LAYOUT_FILE)
        if not os.path.isfile(layout):
            raise GenerationError(f"{folder}: no {LAYOUT_FILE}; write the folder with "
                                  "conv.export_onnx(folder, decoder=True)")
        with open(layout) as f:
            meta = json.load(f)
        self.folder, self.layers = folder, meta["layers"]
        self.input_names, self.output_names = meta["inputs"], meta["outputs"]
        self.session = make_session(os.path.join(folder, MODEL_FILE), provider, threads)
        self.generation_config = self._generation_config(folder)

    @staticmethod
    def _generation_config(folder: str):
        from transformers import GenerationConfig

        if os.path.isfile(os.path.join(folder, "generation_config.json")):
            return GenerationConfig.from_pretrained(folder)
        return GenerationConfig()

    def empty_past(self, batch: int) -> list:
        """The past of a prompt: KV layers with no tokens, linear states at zero (numpy arrays)."""
        from .onnx_decoder import empty_past

        return [t.numpy() for t in empty_past(self.layers, batch)]

    def step(self, input_ids, attention_mask, position_ids, past: list) -> tuple:
        """One graph call; ``(logits, present)`` as numpy arrays (``present`` feeds the next call's ``past``)."""
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64),
                 "position_ids": np.asarray(position_ids, dtype=np.int64)}
        feeds.update(zip(self.input_names[3:], past))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def generate(self, input_ids, attention_mask=None, max_new_tokens: Optional[int] = None,
                 pad_token_id: Optional[int] = None, eos_token_id=None) -> torch.LongTensor:
        """Greedy decoding: ``[B, S + N]`` token ids (prompt first), like transformers' ``generate``."""
        gen = self.generation_config
        ids = torch.as_tensor(input_ids).long()
        if ids.dim() != 2:
            raise GenerationError(f"input_ids must be [batch, seq]; got shape {tuple(ids.shape)}")
        eos = _eos_list(eos_token_id if eos_token_id is not None else gen.eos_token_id)
        pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
        pad = eos[0] if pad is None and eos else pad
        if max_new_tokens is None:
            max_new_tokens = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - ids.shape[1]
        if attention_mask is None:
            infer = pad is not None and bool((ids == pad).any()) and pad not in eos
            attention_mask = (ids != pad).long() if infer else torch.ones_like(ids)
        mask = torch.as_tensor(attention_mask).long().numpy()
        if mask.shape != tuple(ids.shape):
            raise GenerationError(f"attention_mask has shape {mask.shape}; input_ids has {tuple(ids.shape)}")
        batch = ids.shape[0]
        position = np.where(mask == 0, 0, mask.cumsum(-1) - 1)
        tokens, new, past = ids.numpy(), ids.numpy(), self.empty_past(batch)
        unfinished = np.ones(batch, dtype=bool)
        for _ in range(max(0, int(max_new_tokens))):
            logits, past = self.step(new, mask, position, past)
            nxt = logits[:, -1].astype(np.float32).argmax(-1)
            if eos:
                nxt = np.where(unfinished, nxt, pad)
                unfinished &= ~np.isin(nxt, eos)
            tokens = np.concatenate([tokens, nxt[:, None]], 1)
            if eos and not unfinished.any():
                break
            new = nxt[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], 1)
            position = position[:, -1:] + 1
        return torch.from_numpy(np.ascontiguousarray(tokens)).long()


def load_onnx_decoder(folder: str, provider: str = "CPUExecutionProvider", threads: Optional[int] = None) -> OnnxDecoder:
    """The decoder folder written by ``conv.export_onnx(folder, decoder=True)``, ready to ``generate``."""
    return OnnxDecoder(folder, provider, threads)
