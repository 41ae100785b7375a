"""The family matrix: every text family in transformers' auto mappings, built tiny, captured, checked.

    families()            causal LMs, masked LMs and seq2seq LMs named by ``transformers.models.auto``
    tiny_model(family)    hidden 64, 2 layers, 4 heads, vocabulary 128 (``OVERRIDES`` where defaults fail)
    count_attention(...)  attention cores the eager model runs (SDPA calls, softmax over (q, k) scores)
    check(family)         capture with ``convert(passes=[])``, site count, round-trip at (3, 13) ± padding

No family is picked by hand: a new transformers release brings its new families into the matrix.
``examples/family_matrix.py`` prints the table; ``tests/test_families.py`` runs it.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Optional

import torch

__all__ = ["families", "tiny_config", "tiny_model", "make_inputs", "count_attention", "check", "FamilyResult",
           "to_markdown", "TINY", "OVERRIDES"]

TINY = {  # standard name -> value; each config's attribute_map translates it to the family's own name
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 128, "head_dim": 16,
    "n_inner": 128, "ffn_dim": 128, "d_ff": 128, "embedding_size": 64,
    "encoder_layers": 2, "decoder_layers": 2, "num_decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "rotary_dim": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0,
}
OVERRIDES: dict = {}  # family -> {config field: value} where the TINY defaults do not build
TOKENS = 97  # token ids are drawn from [3, TOKENS): no special token
EXACT_TOL = 1e-5


def families() -> list:
    """Sorted text families: the causal-LM, masked-LM and seq2seq-LM auto mappings."""
    from transformers.models.auto import modeling_auto as ma

    names = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES) \
        | set(ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    return sorted(names)


def model_class(family: str):
    """The causal-LM class of a causal family, else its base model class (``MODEL_MAPPING_NAMES``)."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    name = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family) or ma.MODEL_MAPPING_NAMES.get(family)
    if isinstance(name, (tuple, list)):
        name = name[0]
    if name is None:
        raise LookupError(f"{family}: no causal-LM or base model class in the auto mappings")
    return getattr(transformers, name)


def tiny_config(family: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    fields = set(inspect.signature(cls.__init__).parameters)
    default = cls()
    names = getattr(cls, "attribute_map", {}) or {}
    kwargs = {}
    for std, value in TINY.items():
        key = names.get(std, std)
        if key in fields or hasattr(default, key):
            kwargs[key] = value
    kwargs.update(OVERRIDES.get(family, {}))
    return cls(**kwargs)


def tiny_model(family: str, max_params: int = 2_000_000):
    """(model in eval mode, config): seeded random weights; ``ValueError`` when it does not build tiny."""
    cfg = tiny_config(family)
    cls = model_class(family)
    with torch.device("meta"):  # count first: a size the tiny config missed must not fill the memory
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > max_params:
        raise ValueError(f"{family}: the tiny config still has {n / 1e6:.1f}M parameters (a size TINY does "
                         "not set, or sub-configs)")
    torch.manual_seed(0)
    return cls(cfg).eval(), cfg


def make_inputs(model, batch: int, seq: int, pad: bool = False, seed: int = 0) -> dict:
    """input_ids (and attention_mask, decoder_input_ids where the forward takes them); ``pad``: the first
    row left-padded by a third, the last row right-padded by two tokens."""
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(seed * 1000 + batch * 100 + seq)
    ids = torch.randint(3, TOKENS, (batch, seq), generator=g)
    out = {"input_ids": ids}
    if "attention_mask" in params:
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            mask[0, : seq // 3] = 0
            mask[-1, -2:] = 0
        out["attention_mask"] = mask
    if "decoder_input_ids" in params and getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, TOKENS, (batch, seq), generator=g)
    return out


class _CountCores(torch.overrides.TorchFunctionMode):
    """Counts SDPA calls and softmaxes over (…, queries, keys) score tensors of an eager forward."""

    SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.special.softmax}

    def __init__(self, lengths: set):
        super().__init__()
        self.lengths, self.count = lengths, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.count += 1
        elif func in self.SOFTMAX and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3 \
                and args[0].shape[-1] in self.lengths and args[0].shape[-2] in self.lengths:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_attention(model, inputs: dict) -> int:
    """How many attention cores ``model`` runs on ``inputs`` (sequence lengths of the inputs' last dims)."""
    lengths = {t.shape[-1] for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() == 2}
    mode = _CountCores(lengths)
    with torch.no_grad(), mode:
        model(**inputs, **({"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters
                           else {}))
    return mode.count


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]


def rel_err(model, conv, inputs: dict) -> float:
    """Max abs error relative to max(1, output scale); positions NaN in both count as equal."""
    with torch.no_grad():
        ref, out = _first(model(**inputs)).float(), _first(conv(**inputs)).float()
    both = torch.isnan(ref) & torch.isnan(out)
    diff = torch.where(both, torch.zeros_like(ref), (ref - out).abs())
    scale = float(torch.where(torch.isnan(ref), torch.zeros_like(ref), ref.abs()).max())
    err = float(diff.max())
    return err / max(1.0, scale) if not math.isnan(err) else float("inf")


@dataclasses.dataclass
class FamilyResult:
    family: str
    status: str  # "pass" | "refused" | "inexact" | "skipped" | "crashed"
    sites: int = 0
    attention: int = 0  # cores the eager model ran
    max_err: float = float("nan")
    padded_err: float = float("nan")
    error: str = ""  # the exception class (rewrite.errors for "refused")
    message: str = ""
    refusals: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        return self.status == "pass"


def check(family: str) -> FamilyResult:
    """Build ``family`` tiny, convert it with no passes at (2, 8), check it at (3, 13) with and without padding.

    "skipped": the tiny model does not build or does not take token ids; "refused": a ``rewrite.errors``
    class, or recognized sites fewer than the cores run (the refusals say why); "crashed": any other
    exception left ``convert`` (a bug); "inexact": converted but the round-trip is off (a bug).
    """
    import rewrite
    from rewrite.errors import RewriteError

    t0 = time.perf_counter()
    res = FamilyResult(family, "skipped")
    try:
        model, _ = tiny_model(family)
        example = make_inputs(model, 2, 8)
        res.attention = count_attention(model, example)
    except Exception as e:  # noqa: BLE001 - a family that does not build tiny is listed, not fatal
        res.error, res.message = type(e).__name__, _line(e)
        return _done(res, t0)
    try:
        conv = rewrite.convert(model, passes=[], example_inputs=example, progress=False)
    except RewriteError as e:
        res.status, res.error, res.message = "refused", type(e).__name__, _line(e)
        return _done(res, t0)
    except Exception as e:  # noqa: BLE001
        res.status, res.error, res.message = "crashed", type(e).__name__, _line(e)
        return _done(res, t0)
    res.sites, res.refusals = len(conv.sites), list(conv.report.refusals)
    try:
        res.max_err = rel_err(model, conv, make_inputs(model, 3, 13, seed=1))
        res.padded_err = rel_err(model, conv, make_inputs(model, 3, 13, pad=True, seed=1))
    except Exception as e:  # noqa: BLE001
        res.status, res.error, res.message = "crashed", type(e).__name__, _line(e)
        return _done(res, t0)
    if res.sites != res.attention:
        res.status, res.error = "refused", "partial"
        res.message = f"{res.sites} of {res.attention} attention cores recognized" + (
            f": {res.refusals[0]}" if res.refusals else "")
    elif res.max_err <= EXACT_TOL and res.padded_err <= EXACT_TOL:
        res.status = "pass"
    else:
        res.status = "inexact"
    return _done(res, t0)


def _line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:240] if lines else ""


def _done(res: FamilyResult, t0: float) -> FamilyResult:
    res.seconds = time.perf_counter() - t0
    return res


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.1e}"


def to_markdown(results: list) -> str:
    """The family table: family, status, sites (of cores run), max error, padded error, reason."""
    rows = ["| family | status | sites | max error | padded error | reason |", "|---|---|---|---|---|---|"]
    for r in results:
        why = f"{r.error}: {r.message}" if r.error else ""
        why = why.replace("|", "\\|")
        rows.append(f"| {r.family} | {r.status} | {r.sites}/{r.attention} | {_fmt(r.max_err)} | "
                    f"{_fmt(r.padded_err)} | {why} |")
    return "\n".join(rows)
