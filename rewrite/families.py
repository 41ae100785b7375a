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

import torch

__all__ = ["families", "tiny_config", "tiny_model", "make_inputs", "count_attention", "check", "FamilyResult",
           "FamilyTimeout", "STATUSES", "ONNX_TOL", "to_markdown", "summary", "summary_markdown", "refusal_table", "TINY", "OVERRIDES", "EXACT_TOL"]

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
    "dim_ff": 128, "dff": 128, "src_vocab_size": 128, "tgt_vocab_size": 128, "index_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
}
DROP = object()  # an OVERRIDES value: do not pass this TINY field at all
OVERRIDES: dict = {  # family -> {config field: value} where the TINY defaults do not build, or build no attention
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "funnel": {"block_sizes": [1, 1], "num_hidden_layers": DROP},
    "prophetnet": {"num_hidden_layers": DROP, "num_encoder_layers": 2, "num_decoder_layers": 2},
    "esmc": {"num_key_value_heads": 4}, "dots3_note_text": {"num_key_value_heads": 4},
    "zaya": {"num_experts_per_tok": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    # hybrids whose first two layers hold no attention: layer 0 as in the model, layer 1 its attention layer
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "zamba": {"layers_block_type": ["mamba", "hybrid"]}, "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                  "mamba_chunk_size": 16},  # the default SSM sizes make the eager scan take minutes
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},
    "xlnet": {"max_position_embeddings": DROP},
}
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


def _settable(cls, key: str) -> bool:
    """False for a read-only property (FalconConfig.head_dim): passing it would raise."""
    attr = getattr(cls, key, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _is_attention_type(kind) -> bool:
    kind = str(kind)
    return ("attention" in kind and "linear" not in kind) or kind in ("hybrid", "attention")


def _tiny_kwargs(cls, overrides: dict) -> dict:
    """The TINY fields ``cls`` takes (through its attribute_map), tiny sub-configs, then ``overrides``."""
    fields = set(inspect.signature(cls.__init__).parameters)
    default = cls()
    names = getattr(cls, "attribute_map", {}) or {}
    kwargs = {}
    for std, value in TINY.items():
        key = names.get(std, std)
        if (key in fields or hasattr(default, key)) and _settable(cls, key):
            kwargs[key] = value
    # MLA families rotate qk_rope_head_dim dims and call that head_dim (DeepSeek-V3): keep the two equal
    if "qk_rope_head_dim" in kwargs and getattr(default, "head_dim", None) == getattr(default, "qk_rope_head_dim", 0):
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    # MLA expands the latent to every query head (real configs set num_key_value_heads = num_attention_heads);
    # fewer would make transformers' SDPA path repeat the expanded keys once more
    kv_key = names.get("num_key_value_heads", "num_key_value_heads")
    if "kv_lora_rank" in kwargs and kv_key in kwargs:
        kwargs[kv_key] = kwargs.get(names.get("num_attention_heads", "num_attention_heads"), kwargs[kv_key])
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():  # text/vision/audio towers, tiny too
        auto = getattr(sub, "__name__", "") == "AutoConfig"
        if auto:  # the tower the family's default config holds
            sub = type(getattr(default, name, None))
        if not (isinstance(sub, type) and getattr(sub, "model_type", "") and name in fields):
            continue
        try:
            kwargs[name] = _tiny_kwargs(sub, OVERRIDES.get(sub.model_type, {}))
        except Exception:  # noqa: BLE001 - a sub-config without defaults keeps the family's own
            continue
        if auto:
            kwargs[name]["model_type"] = sub.model_type
    # hybrids (LFM, OLMo-hybrid, Bailing): two layers, and one of them must be attention
    layer_types = getattr(default, "layer_types", None)
    if "layer_types" in fields and isinstance(layer_types, (list, tuple)) and layer_types:
        attn = [t for t in layer_types if _is_attention_type(t)]
        if attn and not any(_is_attention_type(t) for t in layer_types[:2]):
            kwargs["layer_types"] = [layer_types[0], attn[0]]
        elif len(layer_types) != kwargs.get("num_hidden_layers", 2):
            kwargs["layer_types"] = list(layer_types[:2])
    kwargs.update(overrides)
    return {k: v for k, v in kwargs.items() if v is not DROP}


def tiny_config(family: str):
    """The family's config at TINY sizes, ``OVERRIDES`` applied."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    return cls(**_tiny_kwargs(cls, OVERRIDES.get(family, {})))


def tiny_model(family: str, max_params: int = 5_000_000):
    """(model in eval mode, config): seeded random weights; ``ValueError`` when it does not build tiny.

    A causal-LM class that takes the text config of a composite one (``Llama4ForCausalLM``) gets that."""
    cfg = tiny_config(family)
    cls = model_class(family)
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(cfg, want) and hasattr(cfg, "get_text_config"):
        text = cfg.get_text_config()
        if isinstance(text, want):
            cfg = text
    with torch.device("meta"):  # count first: a size the tiny config missed must not fill the memory
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > max_params:
        raise ValueError(f"{family}: the tiny config still has {n / 1e6:.1f}M parameters (a size TINY does "
                         "not set, or sub-configs)")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    languages = getattr(cfg, "languages", None)
    if hasattr(model, "set_default_language") and languages:  # X-MOD: one adapter per language
        model.set_default_language(list(languages)[0])
    return model, cfg


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
    """Counts SDPA calls and softmaxes over (…, queries, keys) score tensors of an eager forward.

    A score tensor's last two dims are sequence lengths; the keys may carry one extra column of attention
    sinks (GPT-OSS concatenates them before the softmax). A router's softmax over experts is not counted."""

    SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.special.softmax}

    def __init__(self, lengths: set):
        super().__init__()
        self.lengths, self.count = lengths, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.count += 1
        elif func in self.SOFTMAX and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            queries, keys = args[0].shape[-2], args[0].shape[-1]
            if queries in self.lengths and (keys in self.lengths or keys - 1 in self.lengths):
                self.count += 1
        return func(*args, **(kwargs or {}))


def no_cache(model) -> dict:
    """``use_cache=False`` where the forward takes it (as ``rewrite.capture`` passes it)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def count_attention(model, inputs: dict) -> int:
    """How many attention cores ``model`` runs on ``inputs`` (sequence lengths of the inputs' last dims)."""
    lengths = {t.shape[-1] for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() == 2}
    mode = _CountCores(lengths)
    with torch.no_grad(), mode:
        model(**inputs, **no_cache(model))
    return mode.count


def _first(out):
    """The logits (else the last hidden state, else the first output) of a model's output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        for key in ("logits", "last_hidden_state"):
            if out.get(key) is not None:
                return out[key]
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def rel_err(model, conv, inputs: dict) -> float:
    """Max abs error relative to max(1, output scale); positions NaN in both count as equal."""
    with torch.no_grad():
        ref, out = _first(model(**inputs, **no_cache(model))).float(), _first(conv(**inputs)).float()
    both = torch.isnan(ref) & torch.isnan(out)
    diff = torch.where(both, torch.zeros_like(ref), (ref - out).abs())
    scale = float(torch.where(torch.isnan(ref), torch.zeros_like(ref), ref.abs()).max())
    err = float(diff.max())
    return err / max(1.0, scale) if not math.isnan(err) else float("inf")


STATUSES = ("pass", "refused", "partial", "inexact", "miscounted", "crashed", "timeout", "skipped")


@dataclasses.dataclass
class FamilyResult:
    family: str
    status: str  # one of STATUSES (see ``check``)
    sites: int = 0
    attention: int = 0  # cores the eager model ran
    max_err: float = float("nan")
    padded_err: float = float("nan")
    error: str = ""  # the exception class (a rewrite.errors class for "refused")
    message: str = ""
    refusals: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    gqa: str = ""  # extended checks on a pass: gqa{kv_heads=1} "ok" (finite output) or the error
    onnx_err: float = float("nan")  # ONNX Runtime vs PyTorch, max abs error at a shape other than traced
    onnx: str = ""  # "ok" or the export / parity failure

    @property
    def exact(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class FamilyTimeout(BaseException):
    """Raised (from a signal handler) when one family takes too long; not an ``Exception``, so ``check``
    does not swallow it."""


def check(family: str, extended: bool = False) -> FamilyResult:
    """Build ``family`` tiny, convert it with no passes at (2, 8), check it at (3, 13) with and without padding.

    ``extended`` (on a pass): also ``gqa{kv_heads=1}`` (it must convert and give finite outputs) and ONNX
    export with ONNX Runtime parity (``ONNX_TOL``) at a shape other than traced.

    Statuses: "pass": every attention core the eager model ran is a site and both round-trips are within
    ``EXACT_TOL``; "refused": ``convert`` raised a ``rewrite.errors`` class (``error``) that names the feature;
    "partial": converted, but fewer sites than cores (``refusals`` say why; the rest runs as the model's code);
    "inexact": converted (or verification failed) with a round-trip error above ``EXACT_TOL`` (a bug);
    "miscounted": more sites than cores; "crashed": another exception left ``convert`` or the converted
    model (a bug); "skipped": the tiny model does not build or does not run on token ids (the harness).
    """
    import rewrite
    from rewrite.errors import RewriteError, VerificationError

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
    except VerificationError as e:  # recognized, then computed differently: a wrong op, not a refusal
        res.status, res.error, res.message = "inexact", type(e).__name__, _line(e)
        return _done(res, t0)
    except RewriteError as e:
        res.status, res.error, res.message = "refused", type(e).__name__, _line(e)
        return _done(res, t0)
    except Exception as e:  # noqa: BLE001
        res.status, res.error, res.message = "crashed", type(e).__name__, _line(e)
        return _done(res, t0)
    res.sites, res.refusals = len(conv.sites), [str(r) for r in conv.report.refusals]
    try:
        res.max_err = rel_err(model, conv, make_inputs(model, 3, 13, seed=1))
        res.padded_err = rel_err(model, conv, make_inputs(model, 3, 13, pad=True, seed=1))
    except Exception as e:  # noqa: BLE001 - converted, but the converted model fails at another shape
        res.status = "refused" if isinstance(e, RewriteError) else "crashed"
        res.error, res.message = type(e).__name__, f"running the converted model at (3, 13): {_line(e)}"
        return _done(res, t0)
    exact = res.max_err <= EXACT_TOL and res.padded_err <= EXACT_TOL
    if res.sites < res.attention:
        res.status, res.error = "partial", "Refusal"
        res.message = f"{res.sites} of {res.attention} attention cores recognized" + (
            f"; {res.refusals[0]}" if res.refusals else " and nothing refused")
    elif res.sites > res.attention:
        res.status, res.error = "miscounted", "Count"
        res.message = f"{res.sites} sites but the eager model ran {res.attention} attention cores"
    elif exact:
        res.status = "pass"
    else:
        res.status, res.error = "inexact", "RoundTrip"
        res.message = f"round-trip error {res.max_err:.1e} unpadded, {res.padded_err:.1e} padded"
    if res.status in ("partial", "miscounted") and not exact:
        res.message += f" (and round-trip error {res.max_err:.1e} / {res.padded_err:.1e} padded)"
    if extended and res.status == "pass":
        _extended(res, model, conv, example)
    return _done(res, t0)


ONNX_TOL = 1e-4


def _extended(res: FamilyResult, model, conv, example: dict) -> None:
    """``gqa{kv_heads=1}`` and ONNX parity of ``conv`` (see ``check``); failures are recorded, not raised."""
    import tempfile

    from rewrite.api import restage

    try:
        one = restage(conv, ["gqa{kv_heads=1}"])  # on the same capture
        with torch.no_grad():
            out = _first(one(**make_inputs(model, 3, 13, seed=1))).float()
        res.gqa = "ok" if bool(torch.isfinite(out).all()) else "non-finite output"
    except Exception as e:  # noqa: BLE001 - recorded in the matrix
        res.gqa = f"{type(e).__name__}: {_line(e)}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            info = conv.export_onnx(f"{tmp}/model.onnx")
        res.onnx_err = float(info["max_abs_err"])
        res.onnx = "ok" if res.onnx_err <= ONNX_TOL else f"max abs error {res.onnx_err:.1e}"
    except Exception as e:  # noqa: BLE001
        res.onnx = f"{type(e).__name__}: {_line(e)}"


def _line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:  # "could not capture X (tracing broke in 'm'):" + the cause
        line += " " + lines[1]
    line = line[:240]
    return line.replace("\r", " ")


def _done(res: FamilyResult, t0: float) -> FamilyResult:
    res.seconds = time.perf_counter() - t0
    return res


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.1e}"


def to_markdown(results: list) -> str:
    """The family table: family, status, sites (of cores run), max error, padded error, reason."""
    rows = ["| family | status | sites | max error | padded error | gqa{kv_heads=1} | ONNX | reason |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        why = f"{r.error}: {r.message}" if r.error else ""
        why = why.replace("|", "\\|")
        onnx = _fmt(r.onnx_err) if r.onnx == "ok" else r.onnx.replace("|", "\\|")[:120]
        rows.append(f"| {r.family} | {r.status} | {r.sites}/{r.attention} | {_fmt(r.max_err)} | "
                    f"{_fmt(r.padded_err)} | {r.gqa.replace('|', chr(92) + '|')[:120]} | {onnx} | {why} |")
    return "\n".join(rows)


def summary(results: list) -> dict:
    """Counts: families, per status, exact round-trips with and without padding, refusals by error class."""
    import collections

    def ok(x):
        return not math.isnan(x) and x <= EXACT_TOL

    ran = [r for r in results if not math.isnan(r.max_err)]
    return {
        "families": len(results),
        "built": sum(r.status != "skipped" for r in results),
        "status": {s: n for s in STATUSES if (n := sum(r.status == s for r in results))},
        "exact": sum(r.status == "pass" for r in results),
        "exact_unpadded": sum(ok(r.max_err) for r in ran),
        "exact_padded": sum(ok(r.padded_err) for r in ran),
        "converted": len(ran),
        "refused_by": dict(collections.Counter(r.error for r in results if r.status == "refused").most_common()),
        "skipped_by": dict(collections.Counter(r.error for r in results if r.status == "skipped").most_common()),
        "gqa_checked": sum(bool(r.gqa) for r in results), "gqa_ok": sum(r.gqa == "ok" for r in results),
        "gqa_refused": sum(r.gqa.split(":")[0] in _rewrite_errors() for r in results if r.gqa),
        "onnx_checked": sum(bool(r.onnx) for r in results), "onnx_ok": sum(r.onnx == "ok" for r in results),
    }


def _rewrite_errors() -> set:
    """Names of the ``rewrite.errors`` classes (a named refusal, not a failure)."""
    from . import errors

    return {n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.RewriteError)}


def summary_markdown(results: list) -> str:
    s = summary(results)
    tol = f"{EXACT_TOL:g}"
    lines = [
        f"- {s['families']} families in the auto mappings; {s['built']} build tiny and run on token ids.",
        f"- **{s['exact']} round-trip exactly** (every attention core a site, ≤ {tol} relative with *and* without "
        f"padding). Of the {s['converted']} that convert and run at (3, 13): {s['exact_unpadded']} are exact "
        f"without padding, {s['exact_padded']} with padding.",
        "- Refused with a `rewrite.errors` class: " + (", ".join(f"{n} `{k}`" for k, n in s["refused_by"].items())
                                                      or "none") + f" ({sum(s['refused_by'].values())} in all).",
        "- By status: " + ", ".join(f"{n} {k}" for k, n in s["status"].items()) + ".",
    ]
    if s["onnx_checked"]:
        lines.append(f"- Extended checks on the exact families: `gqa{{kv_heads=1}}` converts and runs on {s['gqa_ok']} "
                     f"of {s['gqa_checked']} (refused with a named `rewrite.errors` class on {s['gqa_refused']}, "
                     f"failed on {s['gqa_checked'] - s['gqa_ok'] - s['gqa_refused']}); ONNX export matches ONNX Runtime (≤ {ONNX_TOL:g}, at a shape other than "
                     f"traced) on {s['onnx_ok']} of {s['onnx_checked']}.")
    bugs = [r for r in results if r.status in ("inexact", "crashed", "miscounted", "timeout")]
    if bugs:
        lines.append("- Bugs (raw exceptions, inexact round-trips, miscounts, timeouts): "
                     + ", ".join(f"{r.family} ({r.status}: {r.error})" for r in bugs) + ".")
    if s["skipped_by"]:
        lines.append("- Skipped (the tiny model does not build or take token ids; the harness, not rewrite): "
                     + ", ".join(f"{n} {k}" for k, n in s["skipped_by"].items()) + ".")
    return "\n".join(lines)


def refusal_reason(r: FamilyResult) -> str:
    """The refusal's cause without the module and node names, so that families refused alike group together:
    ``NoAttentionError: unsupported op 'sub' between the score matmul and softmax``."""
    import re

    msg = r.message
    if r.error == "NoAttentionError" and msg.startswith("no attention found in the model: "):
        first = msg[len("no attention found in the model: "):].split("; ")[0].split(". Fix:")[0]
        msg = first.split(": ", 1)[1] if ": " in first else first
    elif "torch.export: " in msg:
        msg = "torch.export: " + msg.split("torch.export: ", 1)[1]
        msg = re.split(r"(?<=[a-z])[.!] ", msg)[0]
    msg = msg.split(". Fix:")[0].split(" (unhinted")[0]
    msg = re.sub(r"'([a-z_]+?)_\d+'", r"'\1_N'", msg)  # node names
    msg = re.sub(r"\bs\d+\b|\bu\d+\b", "s", msg)  # export's size symbols
    return f"{r.error}: {msg[:140]}"


def refusal_table(results: list) -> str:
    """Refused families grouped by the cause (``refusal_reason``), most common first."""
    import collections

    groups = collections.defaultdict(list)
    for r in results:
        if r.status == "refused":
            groups[refusal_reason(r)].append(r.family)
    rows = ["| families | cause |", "|---|---|"]
    for why, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rows.append(f"| {len(names)}: {', '.join(names)} | {why.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)
