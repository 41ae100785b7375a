"""``conv.save_pretrained(dir)``: a Hugging Face folder of the converted model.

1. **Stock folder** when the family's own config can express the result (a LLaMA-like decoder converted to
   multi-head latent attention: the DeepSeek-V3 config, ``rewrite.hf_deepseek``): every site plain softmax attention
   (no score function, gate or shared atoms) at its original scale and transforms, K and V in equal groups,
   the same (q heads, kv heads, head size) in every layer, and projections the config can resize
   (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``). Query heads are reordered so each KV
   head serves a contiguous block (exact). The folder is reloaded before it is kept and must reproduce the
   converted model; it loads with ``from_pretrained`` without rewrite installed.
2. **Custom-code folder** otherwise: ``model_type = "rewrite_<family>"``, ``auto_map`` to two small files that
   call ``rewrite.hf_remote.family_classes``, and ``config.rewrite`` holding every site's spec
   (``rewrite.site_spec``). It loads with ``trust_remote_code=True``, or without the flag where rewrite is
   installed.

The tokenizer files and the generation config are copied when the source had them. The folder is written
under a temporary name and renamed when complete.
"""
from __future__ import annotations

import copy
import os
import shutil

import torch

from .errors import RewriteError
from .graph import sites
from .hf_adapter import GenerationError, SiteAdapter, source_model
from .hf_checkpoint import HFLayout, flat
from .latent import is_latent
from .shards import publish

__all__ = ["save_pretrained", "stock_state", "custom_config", "write_remote_code"]

FIELDS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "sink_logits")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model", "chat_template.jinja")
REMOTE_FILES = {"configuration_rewrite.py": ("RewriteConfig = family_classes({arch!r})[0]\n"),
                "modeling_rewrite.py": ("RewriteConfig, RewriteModel = family_classes({arch!r})\n")}
HEADER = ('"""Custom code of a model converted by rewrite (pipeline: {spec}); needs the rewrite-attention '
          'package."""\nfrom rewrite.hf_remote import family_classes\n\n')


def _place(target: torch.Tensor, field: str, value: torch.Tensor, index, transposed: bool, resized: bool):
    """``target`` with this field's rows (columns for wo) replaced by ``value`` in checkpoint layout."""
    v = flat(field, value).to(target.dtype)
    if resized:
        return (v.T if transposed else v).contiguous()
    out = target.detach().clone()
    view = out.T if transposed else out  # (out features, in features)
    idx = torch.arange(view.shape[1 if field == "wo" else 0]) if index is None else index
    if field == "wo":
        view[:, idx] = v
    else:
        view[idx] = v
    return out


def stock_state(conv, model):
    """(new config dict, state dict) of the stock form, or (None, reason)."""
    base_ops = sites(conv._captured.gm)
    ops = conv.sites
    state = {k: v for k, v in conv.hf_model().state_dict().items()
             if not any(k.startswith(op.info.name + ".") for op in ops)}
    originals = model.state_dict()
    heads = None
    for op, base in zip(ops, base_ops):
        name = op.info.name
        if is_latent(op) or is_latent(base):
            if op is base:  # a captured MLA site, unchanged: its weights stand as they were
                continue
            from .hf_deepseek import deepseek_stock  # a conversion to MLA: the DeepSeek-V3 form, or why not

            return deepseek_stock(conv, model)
        if op.q_transform is not base.q_transform or op.k_transform is not base.k_transform \
                or op.v_transform is not base.v_transform:
            return None, f"{name}: the per-head transforms changed"
        if op.window is not None:
            return None, f"{name}: the pipeline gives its heads attention spans (local-heads), which a stock config cannot hold"
        try:
            final = HFLayout.normalize(op, base.scale)
        except RewriteError as e:
            return None, str(e)
        got = (final.q_heads, final.k_heads, final.head_dim)
        if heads is not None and got != heads:
            return None, f"heads per layer differ ({heads} vs {got} at {name}); one config holds one count"
        heads = got
        resized = (final.q_heads, final.k_heads) != (base.q_heads, base.k_heads)
        for f in FIELDS:
            src, value = base.info.sources.get(f), getattr(final, f)
            if (src is None) != (value is None):
                return None, f"{name}: the pipeline {'added' if src is None else 'removed'} {f}"
            if src is None:
                continue
            pname, index, transposed = src
            shared = sum(1 for g in FIELDS if base.info.sources.get(g) and base.info.sources[g][0] == pname) > 1
            rows = originals[pname].shape[(0 if transposed else 1) if f == "wo" else (1 if transposed else 0)]
            whole = index is None or torch.equal(index, torch.arange(rows))
            if resized and (shared or not whole):
                return None, f"{name}: {pname} holds {f} with other projections (fused), so it cannot change size"
            state[pname] = _place(state.get(pname, originals[pname]), f, value, index, transposed, resized)
    for key, value in originals.items():  # the attention modules' other tensors (q/k norms, ...) as they were
        state.setdefault(key, value)
    cfg = model.config.to_dict()
    if heads is not None and heads != (base_ops[0].q_heads, base_ops[0].k_heads, base_ops[0].head_dim):
        amap = getattr(model.config, "attribute_map", {}) or {}
        hq, hk, dh = heads
        cfg[amap.get("num_attention_heads", "num_attention_heads")] = hq
        cfg[amap.get("num_key_value_heads", "num_key_value_heads")] = hk
        if "head_dim" in cfg or dh * hq != getattr(model.config, "hidden_size", dh * hq):
            cfg["head_dim"] = dh
    return cfg, state


def _auto_class(model):
    from .hf_remote import auto_classes_of

    autos = auto_classes_of(type(model).__name__, model.config.model_type)
    return autos or ["AutoModel"]


def _reload_error(conv, folder: str, auto: str, **kw) -> float:
    import transformers

    again = getattr(transformers, auto).from_pretrained(folder, **kw).eval()
    cap = conv._captured
    with torch.no_grad():
        a = _main(again(**cap.kwargs, **cap.fixed))
        b = _main(conv(**cap.kwargs))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _main(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _write_stock(conv, model, cfg: dict, state: dict, tmp: str) -> None:
    from .hf_checkpoint import build_model

    config = cfg if not isinstance(cfg, dict) else type(model.config).from_dict(cfg)  # a config: another family's
    new = build_model(config, meta=True)
    missing = set(new.state_dict()) - set(state)
    if missing:
        raise GenerationError(f"the stock model needs tensors the conversion does not have: {sorted(missing)[:3]}")
    new.load_state_dict({k: state[k] for k in new.state_dict()}, strict=True, assign=True)
    new.to(next(model.parameters()).dtype)
    if getattr(model, "generation_config", None) is not None and new.can_generate():
        new.generation_config = copy.deepcopy(model.generation_config)
    new.save_pretrained(tmp)


def _write_custom(conv, model, tmp: str) -> None:
    from .hf_remote import family_classes
    from .site_spec import op_spec, plan_spec

    arch = type(model).__name__
    _, model_cls = family_classes(arch)
    hf = conv.hf_model()
    groups: dict = {}
    specs = []
    for name, mod in hf.named_modules():
        if isinstance(mod, SiteAdapter):
            specs.append({"op": op_spec(mod.op, groups), "plan": plan_spec(mod.plan)})
    config = custom_config(model.config.to_dict(), arch, conv.report.pipeline, specs, _auto_class(model))
    with torch.device("meta"):
        new = model_cls(config)
    own = hf.state_dict()
    state = {}
    for key in new.state_dict():
        if key in own:
            state[key] = own[key]
        else:  # a constant of a per-head transform or replay graph (a plain attribute in the live graphs)
            owner, _, attr = key.rpartition(".")
            state[key] = getattr(hf.get_submodule(owner), attr)
    new.load_state_dict(state, strict=True, assign=True)
    if getattr(model, "generation_config", None) is not None and new.can_generate():
        new.generation_config = copy.deepcopy(model.generation_config)
    new.save_pretrained(tmp)
    write_remote_code(tmp, arch, conv.report.pipeline)


def custom_config(cfg: dict, arch: str, pipeline: str, specs: list, autos: list):
    """The custom-code config of family ``arch`` (stock config dict ``cfg``) holding every site's spec."""
    from .hf_remote import family_classes

    config_cls, model_cls = family_classes(arch)
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    config = config_cls(**cfg, rewrite={"version": 1, "pipeline": pipeline, "sites": specs})
    config.architectures = [model_cls.__name__]
    config.auto_map = {"AutoConfig": "configuration_rewrite.RewriteConfig",
                       **{auto: "modeling_rewrite.RewriteModel" for auto in autos}}
    return config


def write_remote_code(folder: str, arch: str, pipeline: str) -> None:
    """The two small files a custom-code folder's ``auto_map`` names."""
    for fname, body in REMOTE_FILES.items():
        with open(os.path.join(folder, fname), "w", encoding="utf-8") as f:
            f.write(HEADER.format(spec=pipeline or "[]") + body.format(arch=arch))


def _copy_tokenizer(model, tmp: str) -> list:
    src = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    copied = []
    if src and os.path.isdir(src):
        for fname in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, fname)):
                shutil.copy2(os.path.join(src, fname), os.path.join(tmp, fname))
                copied.append(fname)
    return copied


def save_pretrained(conv, out_dir: str, stock: bool = True) -> dict:
    """Write ``conv`` as a Hugging Face folder; returns {"kind": "stock"|"custom", "reason", "path", ...}."""
    model = source_model(conv, "save_pretrained")
    auto = _auto_class(model)[0]
    tmp = out_dir.rstrip("/") + f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        cfg, state = stock_state(conv, model) if stock else (None, "a custom-code folder was asked for")
        reason = state if cfg is None else None
        kind = "custom"
        if cfg is not None:
            _write_stock(conv, model, cfg, state, tmp)
            err = _reload_error(conv, tmp, auto)
            if err <= 1e-4:
                kind = "stock"
            else:
                reason = f"the stock folder does not reproduce the converted model (relative error {err:.2g})"
                shutil.rmtree(tmp)
                os.makedirs(tmp)
        if kind == "custom":
            _write_custom(conv, model, tmp)
        tokenizer = _copy_tokenizer(model, tmp)
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"kind": kind, "reason": reason, "path": out_dir, "auto_class": auto, "tokenizer": tokenizer}
