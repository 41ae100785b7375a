"""ONNX decoder with past KV: one decode graph for prompt and steps, checked in ONNX Runtime.

    logits, present.{i}.* = model.onnx(input_ids [B, N], attention_mask [B, P+N], position_ids [B, N],
                                       past_key_values.{i}.key, past_key_values.{i}.value)

Per layer i (the converted head counts, so layers may differ: DHA, global pruning):
  - softmax sites: ``past_key_values.{i}.key [B, Hk_i, P, dh]``, ``.value [B, Hv_i, P, dv]``;
    ``present.{i}.*`` hold the P+N tokens. An empty past (P = 0) is the prompt.
  - LiT sites (a recurrent score function): the fixed-size state, ``past_key_values.{i}.key`` =
    S = Σ φ(k)ᵀv ``[B, Pairs, d, dv]`` and ``.value`` = z = Σ φ(k) ``[B, Pairs, d]`` (fp32, zeros for the
    prompt); the tokens already folded in are ``attention_mask.shape[1] - N``, nothing is specialized.
  - multi-head latent attention sites (``rewrite.latent``): ``past_key_values.{i}.key`` = the latent
    c ``[B, 1, P, r]``, ``.value`` = the RoPE keys ``[B, R, P, d_rope]``; prompt and steps run the absorbed form
    (``W_uk`` folded into the query, ``W_uv`` after the weighted latent) as MatMul/Softmax, so no per-head K/V
    of a past token is built. onnxruntime-genai cannot describe this past (``onnx_genai.genai_problem``).
Batch, P and N are dynamic. The graph runs ``conv.hf_model()`` (the converted ops inside the source
family's Hugging Face model) on a ``DynamicCache`` built from the past tensors, with the causal+padding mask
built here as HF's SDPA mask (keep = mask[b, j] ∧ j ≤ P + i; additive for eager attention). Softmax sites
are standard ONNX ``Attention`` nodes (opset 23, GQA native).

The folder also holds ``decoder.json`` (layer kinds and shapes, read by ``rewrite.load_onnx_decoder``),
``config.json``, ``generation_config.json``, the tokenizer files when the source folder had them and, where
every layer has one KV head count, ``genai_config.json`` for onnxruntime-genai (``backends/onnx_genai.py``).

Refused (``GenerationError``): models that cannot generate (encoder-only, non-Hugging Face), sliding-window
layer types, a layer without a converted site, cross-attention.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Optional

import torch
from torch import nn

from rewrite.cache import LinearStateLayer
from rewrite.hf_adapter import GenerationError, SiteAdapter, source_model
from rewrite.latent import is_latent

__all__ = ["export_decoder", "decoder_layers", "DecodeStep", "MODEL_FILE", "LAYOUT_FILE"]

MODEL_FILE, LAYOUT_FILE = "model.onnx", "decoder.json"
DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


def decoder_layers(conv) -> list:
    """Per cache layer: ``{"kind": "kv"|"state"|"latent", "key": [heads, d...], "value": [...], "dtype", "q_heads"}``
    (shapes without batch and, for KV, without the token axis)."""
    hf = conv.hf_model()
    adapters = sorted((m for m in hf.modules() if isinstance(m, SiteAdapter)), key=lambda m: m.layer_idx)
    layers = hf.config.get_text_config(decoder=True).num_hidden_layers
    idx = [a.layer_idx for a in adapters]
    if idx != list(range(layers)):
        raise GenerationError(f"the ONNX decoder needs one converted attention site per layer; the cache layers "
                              f"of the sites are {idx} for {layers} layers")
    out = []
    for a in adapters:
        op = a.op
        if op.info.cross:
            raise GenerationError(f"{op.info.name}: cross-attention cannot be exported as a decoder with past KV")
        if is_latent(op):  # the past is the latent c and the RoPE keys, read in the absorbed form
            out.append({"kind": "latent", "key": [1, op.kv_rank], "value": [op.rope_heads, op.rope_dim],
                        "dtype": str(op.w_dkv.dtype).replace("torch.", ""), "q_heads": op.q_heads})
        elif getattr(op.score_fn, "recurrent", False):
            pairs = len(set(zip(op.k_map.tolist(), op.v_map.tolist())))
            f = getattr(op.score_fn, "feature_dim", 0) or op.head_dim  # features per head
            out.append({"kind": "state", "key": [pairs, f, op.v_head_dim], "value": [pairs, f],
                        "dtype": "float32", "q_heads": op.q_heads})
        else:
            dtype = str(op.wk.dtype).replace("torch.", "")
            out.append({"kind": "kv", "key": [op.k_heads, op.head_dim], "value": [op.v_heads, op.v_head_dim],
                        "dtype": dtype, "q_heads": op.q_heads})
    return out


class _StateLayer(LinearStateLayer):
    """A linear state given as graph inputs: always present (zeros for the prompt), token count symbolic."""

    def __init__(self, s, z, tokens):
        super().__init__()
        self.keys, self.values, self.tokens = s, z, tokens
        self.device, self.is_initialized = s.device, True

    def absorb(self, s, z, tokens) -> None:
        self.keys, self.values = s, z
        self.tokens = self.tokens + tokens  # no int(): a symbol while exporting

    def state(self):
        return self.keys, self.values


def step_mask(attention_mask: torch.Tensor, new: int, additive_dtype=None) -> torch.Tensor:
    """``[B, 1, N, P+N]`` keep mask of the new tokens (bottom-right causal ∧ padding), as HF's SDPA mask;
    additive (0 / dtype min) when ``additive_dtype`` is given (eager attention)."""
    total = attention_mask.shape[1]
    device = attention_mask.device
    query_pos = torch.arange(new, device=device) + (total - new)
    keep = attention_mask.bool()[:, None, None, :] & (torch.arange(total, device=device)[None, :] <= query_pos[:, None])
    if additive_dtype is None:
        return keep
    return torch.zeros(keep.shape, dtype=additive_dtype, device=device).masked_fill(~keep, torch.finfo(additive_dtype).min)


class DecodeStep(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` around ``conv.hf_model()``."""

    def __init__(self, hf, layers: list):
        super().__init__()
        self.hf, self.layers = hf, layers
        eager = getattr(hf.config, "_attn_implementation", "sdpa") == "eager"
        self.additive = hf.dtype if eager else None

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        new = input_ids.shape[1]
        cache = DynamicCache()
        for i, spec in enumerate(self.layers):
            k, v = past[2 * i], past[2 * i + 1]
            if spec["kind"] == "state":
                layer = _StateLayer(k, v, attention_mask.shape[1] - new)
            else:
                layer = DynamicLayer()
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            cache.layers.append(layer)
        mask = step_mask(attention_mask, new, self.additive)
        out = self.hf(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                      use_cache=True)
        presents = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def io_names(n_layers: int) -> tuple:
    kv = [(i, part) for i in range(n_layers) for part in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{p}" for i, p in kv],
            ["logits"] + [f"present.{i}.{p}" for i, p in kv])


def empty_past(layers: list, batch: int, past: int = 0, fill=None) -> list:
    """Past tensors for ``batch`` sequences: KV layers with ``past`` tokens (zeros, or ``fill(shape)``), states."""
    out = []
    for spec in layers:
        dtype = getattr(torch, spec["dtype"])
        for part in ("key", "value"):
            shape = [batch, *spec[part]]
            if spec["kind"] != "state":
                shape.insert(2, past)
            out.append(torch.zeros(shape, dtype=dtype) if fill is None else fill(shape).to(dtype))
    return out


def _example(layers: list, vocab: int, batch: int = 2, past: int = 5, new: int = 3, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, new), generator=g)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, past:]
    return [ids, mask, pos, *empty_past(layers, batch, past, lambda s: torch.rand(s, generator=g))]


def _dynamic_shapes(layers: list) -> tuple:
    from torch.export import Dim

    batch, new, past, total = (Dim(n) for n in DIMS)
    shapes = [{0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new}]
    for spec in layers:
        shapes += [{0: batch} if spec["kind"] == "state" else {0: batch, 2: past}] * 2
    return tuple(shapes[:3]) + (tuple(shapes[3:]),)


def _name_dims(path: str, layers: list) -> None:
    """Readable symbolic dims on the file's inputs/outputs: batch_size, sequence_length, past/total length."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    names = {dims["input_ids"][0]: DIMS[0], dims["input_ids"][1]: DIMS[1]}
    kv = next((i for i, s in enumerate(layers) if s["kind"] != "state"), None)
    if kv is not None:
        names[dims[f"past_key_values.{kv}.key"][2]] = DIMS[2]
    names = {k: v for k, v in names.items() if k}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None

    def rename(text: str) -> str:
        if not text or pattern is None:
            return text
        text = pattern.sub(lambda m: names[m.group(1)], text)
        parts = sorted(p.strip() for p in text.split("+"))
        return DIMS[3] if parts == sorted(DIMS[1:3]) else text

    total = dims["attention_mask"][1]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = DIMS[3] if d.dim_param == total and kv is None else rename(d.dim_param)
    onnx.save(model, path)


@contextlib.contextmanager
def _static_pairs(conv):
    """LiT's ``_pairs(op)`` reads the head maps with ``tolist()``, which export cannot do on its (fake) buffers:
    for the duration of the export it answers from values computed here, once per op (graph constants)."""
    patched = []
    for op in conv.sites:
        if getattr(op.score_fn, "recurrent", False):
            module = sys.modules[type(op.score_fn).__module__]
            if hasattr(module, "_pairs") and all(m is not module for m, _ in patched):
                patched.append((module, module._pairs))
    known = {id(op): original(op) for op in conv.sites for module, original in patched[:1]
             if getattr(op.score_fn, "recurrent", False)}
    for module, original in patched:
        module._pairs = lambda op, _orig=original: known[id(op)] if id(op) in known else _orig(op)
    try:
        yield
    finally:
        for module, original in patched:
            module._pairs = original


def _check(step: DecodeStep, session, layers: list, vocab: int) -> dict:
    """Max abs error of ONNX Runtime against PyTorch on shapes the graph was not traced with."""
    from .ort_session import run_session

    names = io_names(len(layers))[0]
    err, checked = 0.0, []
    for batch, past, new, pad in ((3, 6, 2, 3), (1, 0, 4, 0), (2, 9, 1, 4)):
        args = _example(layers, vocab, batch, past, new, pad, seed=batch + past)
        with torch.no_grad():
            expected = step(*args)
        got = run_session(session, dict(zip(names, args)))
        for a, b in zip(got, expected):
            if tuple(a.shape) != tuple(b.shape):
                raise GenerationError(f"ONNX Runtime returned shape {tuple(a.shape)} where PyTorch returns "
                                      f"{tuple(b.shape)} (batch {batch}, past {past}, new {new})")
            err = max(err, float((a.double() - b.double()).abs().max()))
        checked.append({"batch": batch, "past": past, "new": new})
    return {"max_abs_err": err, "checked": checked}


def _refuse_non_decoders(conv):
    model = source_model(conv, "the ONNX decoder export")
    if not model.can_generate():
        raise GenerationError(f"the ONNX decoder export needs a language-model head; {type(model).__name__} is an "
                              "encoder-only or base model that cannot generate. Export it with "
                              "conv.export_onnx('model.onnx') (no past KV), or convert its *ForCausalLM class")
    kinds = set(getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        raise GenerationError(f"the ONNX decoder export supports full-attention layers only; this model has layer "
                              f"types {sorted(kinds)} (sliding-window caches are not exported)")
    return model


def export_decoder(conv, out_dir: str, opset: int = 23, check: bool = True, genai: Optional[bool] = None,
                   provider: str = "CPUExecutionProvider") -> dict:
    """Write the decode graph of ``conv`` to ``out_dir/model.onnx`` (+ ``model.onnx.data`` when large).

    Args:
        conv: a converted Hugging Face decoder (``rewrite.convert`` of a ``*ForCausalLM``).
        out_dir: the folder to write (created).
        opset: 23 or newer (standard ``Attention``).
        check: run the file in ONNX Runtime at other batch sizes and past/new lengths (an empty past too)
            and record the max abs error against PyTorch.
        genai: write ``genai_config.json``: None = where possible (one KV head count for all layers, no
            LiT state), True = required (refused with the reason otherwise), False = never.
    Returns:
        what was written, also stored in ``conv.report.extras["onnx_decoder"]``.
    """
    from .onnx import TWO_GB, _export_mode, _param_bytes, choose_gqa, onnx_summary, save_export
    from .onnx_genai import genai_problem, write_genai_config

    t0 = time.perf_counter()
    if opset < 23:
        raise GenerationError(f"opset {opset}: the decoder export needs opset 23 or newer (standard Attention op)")
    model = _refuse_non_decoders(conv)
    layers = decoder_layers(conv)
    problem = genai_problem(layers)
    if genai and problem:
        raise GenerationError(f"genai_config.json cannot be written: {problem}")
    hf = conv.hf_model()
    step = DecodeStep(hf, layers).eval()
    vocab = hf.config.get_text_config(decoder=True).vocab_size
    inputs, outputs = io_names(len(layers))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    external = _param_bytes(hf) > TWO_GB * 0.9
    native, note = choose_gqa(conv, "auto", provider, check)
    with _export_mode(native), _static_pairs(conv):
        save_export(step, tuple(_example(layers, vocab)), path, opset, external, GenerationError, "ONNX decoder export",
                    dynamic_shapes=_dynamic_shapes(layers), input_names=inputs, output_names=outputs)
    _name_dims(path, layers)
    with open(os.path.join(out_dir, LAYOUT_FILE), "w") as f:
        json.dump({"format": 1, "layers": layers, "inputs": inputs, "outputs": outputs, "vocab_size": vocab,
                   "pipeline": conv.report.pipeline}, f, indent=1)
    hf.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    from rewrite.hf_save import _copy_tokenizer

    info = {"path": os.path.abspath(path), "opset": opset, "external_data": external, "layers": layers,
            "tokenizer": _copy_tokenizer(model, out_dir), **onnx_summary(path)}
    if note:
        info["note"] = note
    info["genai"] = {"written": False, "reason": problem or "not asked for"} if (problem or genai is False) else \
        {"written": True, "path": write_genai_config(out_dir, hf, layers, model.generation_config)}
    if check:
        from .ort_session import make_session

        info.update(_check(step, make_session(path, provider), layers, vocab))
    info["seconds"] = round(time.perf_counter() - t0, 3)
    conv.report.extras["onnx_decoder"] = info
    return info
