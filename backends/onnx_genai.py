"""``genai_config.json`` beside an ONNX decoder, so that onnxruntime-genai generates from the folder.

The decode graph of ``backends/onnx_decoder.py`` already has the names and layout genai's decoder reads
(``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.%d.key/value`` ``[B, Hk, P, dh]`` in,
``logits``, ``present.%d.key/value`` out); ``past_present_share_buffer`` is false because ``present`` holds
P+N tokens (the graph concatenates, it does not write into a max-length buffer).

Refused (``genai_problem`` says why, ``export_decoder(genai=True)`` raises it):
  1. per-layer KV head counts (DHA, global pruning): ONNX Runtime GenAI 0.18 allocates KV outputs with one
     global head count (``num_key_value_heads``);
  2. key and value head counts or head sizes that differ within a layer (one ``head_size``);
  3. LiT's fixed-size state (genai's KV cache grows with the sequence);
  4. multi-head latent attention's past (the latent and the RoPE key: genai has no form for it).
"""
from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["genai_problem", "write_genai_config", "GENAI_FILE"]

GENAI_FILE = "genai_config.json"
PER_LAYER = "ONNX Runtime GenAI 0.18 allocates KV outputs with one global head count"


def genai_problem(layers: list) -> Optional[str]:
    """Why genai cannot run a decoder with these layers (``decoder_layers`` output), or None."""
    if any(s["kind"] == "latent" for s in layers):
        return ("multi-head latent attention layers cache the latent c [B, 1, T, r] and the RoPE key [B, R, T, dr]; "
                "onnxruntime-genai's decoder config describes per-head keys and values of one head size only "
                "(use rewrite.load_onnx_decoder)")
    if any(s["kind"] == "state" for s in layers):
        return ("LiT layers keep a fixed-size state (S, z), not a KV cache; onnxruntime-genai only grows KV caches "
                "(use rewrite.load_onnx_decoder)")
    heads = sorted({s["key"][0] for s in layers} | {s["value"][0] for s in layers})
    sizes = sorted({s["key"][1] for s in layers} | {s["value"][1] for s in layers})
    if len({s["key"][0] for s in layers}) > 1 or len({s["value"][0] for s in layers}) > 1:
        per_layer = [s["key"][0] for s in layers]
        return f"{PER_LAYER}; the layers have {per_layer} KV heads (use rewrite.load_onnx_decoder)"
    if len(heads) > 1 or len(sizes) > 1:
        return (f"{PER_LAYER} and one head size for keys and values; keys and values have {heads} heads of sizes "
                f"{sizes} (use rewrite.load_onnx_decoder)")
    return None


def _token(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return None if value is None else int(value)


def write_genai_config(out_dir: str, hf, layers: list, generation_config=None, filename: str = "model.onnx") -> str:
    """Write ``genai_config.json`` for a uniform decoder; its path."""
    problem = genai_problem(layers)
    if problem:
        from rewrite.hf_adapter import GenerationError

        raise GenerationError(f"genai_config.json cannot be written: {problem}")
    cfg = hf.config.get_text_config(decoder=True)
    gen = generation_config
    eos = _token(getattr(gen, "eos_token_id", None) if gen is not None else None) or _token(cfg.eos_token_id)
    pad = _token(getattr(gen, "pad_token_id", None) if gen is not None else None)
    pad = pad if pad is not None else _token(cfg.pad_token_id)
    if pad is None:  # as transformers: the (first) eos token pads finished sequences
        pad = eos[0] if isinstance(eos, list) else eos
    context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2048)
    config = {
        "model": {
            "bos_token_id": _token(getattr(cfg, "bos_token_id", None)),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layers[0]["key"][1],
                "hidden_size": int(cfg.hidden_size),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": layers[0]["q_heads"],
                "num_hidden_layers": len(layers),
                "num_key_value_heads": layers[0]["key"][0],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",  # genai's generic decoder-only model: it reads the graph by the names above
            "vocab_size": int(cfg.vocab_size),
        },
        "search": {"do_sample": False, "early_stopping": True, "max_length": context, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }
    path = os.path.join(out_dir, GENAI_FILE)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return os.path.abspath(path)

