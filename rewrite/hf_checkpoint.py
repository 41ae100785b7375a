"""How canonical attention sites map onto a Hugging Face checkpoint: template, names, write-back, config.

- ``SiteTemplate``: the model built from its config with only its first layer (one layer per distinct
  ``layer_types`` entry), a tiny vocabulary and MLP and random weights; its attention shapes are the real
  ones. Capturing it gives each site's provenance ``op.info.sources`` (the tensor behind wq, bq, ...),
  moved to every layer by renaming ``model.layers.0.`` to ``model.layers.i.``.
- ``HFLayout``: per layer, the checkpoint name of each canonical field; checkpoint tensors -> op
  (``heads.rebuild`` of the template op) and op -> tensors: q_proj.weight = wq.reshape(Hq·dh, D),
  o_proj.weight = wo.reshape(D, Hq·dv), in the checkpoint's dtype.
- ``Writeback``: puts each final op into Hugging Face form (query heads reordered so each KV head serves one
  contiguous block: exact) and, at the first layer, fixes the new config.json (num_attention_heads,
  num_key_value_heads, head_dim) and checks that the family built from it (meta device) has exactly the
  shapes about to be written.

Refused, with the reason: fused or transposed q/k/v (GPT-2, Falcon, Phi-3); head counts that differ between
layers; K and V grouped differently or in unequal groups; score functions, head gates, shared weight atoms or
a changed scale (a Hugging Face checkpoint of these families cannot hold them).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import types as types_ns

import torch

from .errors import RewriteError
from .heads import query_fields, rebuild
from .shards import Checkpoint

__all__ = ["FIELDS", "build_model", "HFLayout", "SiteTemplate", "Writeback"]

FIELDS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def flat(field: str, v: torch.Tensor) -> torch.Tensor:
    """A canonical field in checkpoint form: wq [H, d, D] -> [H·d, D], wo [D, H, d] -> [D, H·d], biases 1-D."""
    if field == "wo":
        return v.reshape(v.shape[0], -1)
    return v.reshape(-1, v.shape[-1]) if field[0] == "w" else v.reshape(-1)


def build_model(cfg, meta: bool = False):
    """The model class named by ``cfg.architectures`` (else the causal LM / base auto class), in fp32."""
    import transformers

    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta") if meta else contextlib.nullcontext():
        if cls is not None:
            model = cls(cfg)
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
            except ValueError:
                model = transformers.AutoModel.from_config(cfg)
    return model.float().eval()


class HFLayout:
    """Where each canonical field of each layer lives in the checkpoint, and how to write it back."""

    def __init__(self, ckpt: Checkpoint, site_names: list, sources: list, shapes: dict, family: str):
        self.ckpt, self.family = ckpt, family
        self.fields = []  # per layer: {field: checkpoint tensor name}
        self.site_names = site_names
        for name, src in zip(site_names, sources):
            self.fields.append({f: ckpt.resolve(s[0]) for f, s in src.items() if s is not None})
        if sources:
            self.check_sources(sources[0], shapes)

    def check_sources(self, src: dict, shapes: dict) -> None:
        qkv = [src[f][0] for f in ("wq", "wk", "wv") if src.get(f)]
        if len(set(qkv)) < len(qkv):
            raise RewriteError(f"{self.family} stores q, k and v in one fused tensor ({qkv[0]}); streaming writes "
                               "separate q/k/v projections (LLaMA, Qwen2, Mistral style). Convert it in memory "
                               "with rewrite.convert instead")
        for f, s in src.items():
            if s is None:
                continue
            name, index, transposed = s
            rows = shapes[name][1 if f == "wo" else 0]
            if transposed or (index is not None and not torch.equal(index, torch.arange(rows))):
                how = "transposed" if transposed else "in a permuted or partial head layout"
                raise RewriteError(f"{self.family} stores {f} as {name} {how}; streaming writes only plain "
                                   "q/k/v/o projections (LLaMA, Qwen2, Mistral style)")

    def layer_of(self) -> dict:
        return {n: i for i, fields in enumerate(self.fields) for n in fields.values()}

    @staticmethod
    def to_op(template, tensors: dict):
        """The template op with the checkpoint's weights (fp32)."""
        return rebuild(template, **{f: t.float().reshape(getattr(template, f).shape) for f, t in tensors.items()})

    def to_tensors(self, i: int, op, dtype) -> dict:
        """Checkpoint tensors of layer i from a HF-layout op."""
        out = {}
        for f in FIELDS:
            v, name = getattr(op, f), self.fields[i].get(f)
            if (v is None) != (name is None):
                raise RewriteError(f"{op.info.name}: the pipeline {'removed' if v is None else 'added'} {f}, and "
                                   f"{self.family} has {'no' if name is None else 'a'} tensor for it")
            if v is None:
                continue
            out[name] = flat(f, v).detach().to(dtype).contiguous()
        return out

    @staticmethod
    def normalize(op, scale: float):
        """Reorder query heads so every KV head serves one contiguous block (HF repeat_kv order). Exact."""
        where = op.info.name
        extra = [what for what, attr in (("a score function", "score_fn"), ("a head gate", "head_gate"),
                                         ("weights shared across layers (matrix atoms)", "weights"))
                 if getattr(op, attr, None) is not None]
        if extra:
            raise RewriteError(f"{where}: the pipeline adds {extra[0]}; the family's stock config cannot "
                               "hold it (save_pretrained writes a custom-code folder for such models)")
        if abs(op.scale - scale) > 1e-12 * scale:
            raise RewriteError(f"{where}: the pipeline changes the softmax scale, which a Hugging Face config "
                               "cannot hold")
        if op.k_heads != op.v_heads or not torch.equal(op.k_map, op.v_map) or op.head_dim != op.v_head_dim:
            raise RewriteError(f"{where}: keys and values use different head maps or sizes; Hugging Face "
                               "LLaMA-style attention shares one num_key_value_heads grouping")
        if op.bias_map is not None and not op._bias_identity:
            raise RewriteError(f"{where}: the pipeline changes the query heads of a per-head score bias (ALiBi, "
                               "relative position); the family's stock code computes the bias for its own heads "
                               "(save_pretrained writes a custom-code folder for such models)")
        hq, hk = op.q_heads, op.k_heads
        if hq % hk or not bool((torch.bincount(op.k_map, minlength=hk) == hq // hk).all()):
            raise RewriteError(f"{where}: KV heads serve unequal numbers of query heads "
                               f"({torch.bincount(op.k_map, minlength=hk).tolist()}); repeat_kv needs equal groups")
        order = torch.argsort(op.k_map, stable=True)
        if torch.equal(order, torch.arange(hq)):
            return op
        return rebuild(op, **query_fields(op, order), k_map=op.k_map[order], v_map=op.v_map[order])


class SiteTemplate:
    """The 1-layer (one per layer type) copy of the model: site ops, their inputs and checkpoint names."""

    def __init__(self, ckpt: Checkpoint):
        cached = _captured(json.dumps(ckpt.config, sort_keys=True), ckpt.folder)
        self.cfg, self.family, self.ops, self.args, self.site_of, shapes, self.plans = cached
        self.n_layers = len(self.site_of)
        self.own_names = {f: s[0] for f, s in self.ops[0].info.sources.items() if s}
        names = [self.renamed(self.site_of[i], i) for i in range(self.n_layers)]
        self.layout = HFLayout(ckpt, [n for n, _ in names], [s for _, s in names], shapes, self.family)

    @staticmethod
    def shrunk(cfg, layers: int):
        small = copy.deepcopy(cfg)
        small.num_hidden_layers = layers
        if getattr(small, "layer_types", None):
            small.layer_types = list(small.layer_types[:layers])
        for key, value in (("vocab_size", 128), ("intermediate_size", 16)):
            if hasattr(small, key):
                setattr(small, key, value)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if hasattr(small, key):
                setattr(small, key, None)
        return small

    def renamed(self, j: int, i: int):
        """(site name, sources) of template site j moved to layer i."""
        op = self.ops[j]
        parts = op.info.name.split(".")
        if str(j) not in parts:
            raise RewriteError(f"cannot tell the layer index of site {op.info.name}")
        k = len(parts) - 1 - parts[::-1].index(str(j))
        old, new = ".".join(parts[:k + 1]) + ".", ".".join(parts[:k] + [str(i)]) + "."

        def move(name):
            if not name.startswith(old):
                raise RewriteError(f"{name} is outside its site's layer {old}")
            return new + name[len(old):]

        src = {f: (move(s[0]), s[1], s[2]) if s else None for f, s in op.info.sources.items()}
        return move(op.info.name + ".")[:-1], src


_CACHE: dict = {}  # config.json text -> _captured(...) of the last two configs


def _captured(config_json: str, folder: str):
    """(config, family, template ops, their inputs, template site of each layer, parameter shapes, and each
    template site's ``hf_adapter.SitePlan``: how its Hugging Face module's arguments feed the op).

    Cached per config: the ops are only ever copied (``heads.rebuild``), never changed.
    """
    if config_json not in _CACHE:
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[config_json] = _capture_template(folder)
    return _CACHE[config_json]


def _capture_template(folder: str):
    import transformers

    from .api import canonicalize
    from .calibrate import record_site_inputs
    from .capture import capture
    from .graph import sites
    from .hf_adapter import site_plans

    cfg = transformers.AutoConfig.from_pretrained(folder)
    family = (getattr(cfg, "architectures", None) or [type(cfg).__name__])[0]
    n_layers = cfg.num_hidden_layers
    types = list(getattr(cfg, "layer_types", None) or ["layer"] * n_layers)
    first = {}
    for i, t in enumerate(types):
        first.setdefault(t, i)
    keep = max(first.values()) + 1
    small = SiteTemplate.shrunk(cfg, keep)
    model = build_model(small)
    ids = torch.randint(0, small.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    cap = capture(model, (ids,))
    gm, _ = canonicalize(cap)
    ops = sites(gm)
    if len(ops) != keep:
        raise RewriteError(f"{family}: {len(ops)} attention sites in {keep} layer(s); streaming handles exactly "
                           "one attention per layer")
    args = [r[0].args for r in record_site_inputs(gm, lambda kw: gm(**kw, **cap.fixed), [cap.kwargs])]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        plans = site_plans(types_ns.SimpleNamespace(_captured=cap, sites=ops), model)
    except RewriteError as e:  # only calibrated streaming runs layers (and needs them); it says why
        plans = e
    del model, cap, gm
    gc.collect()  # the captured graph modules are reference cycles holding the template's weights
    return cfg, family, ops, args, [first[types[i]] for i in range(n_layers)], shapes, plans


class Writeback:
    """Turns each layer's final op into checkpoint tensors; fixes the config at the first layer written."""

    def __init__(self, ckpt: Checkpoint, cfg, layout: HFLayout, own_names: dict):
        self.ckpt, self.cfg, self.layout, self.own_names = ckpt, cfg, layout, own_names
        self.first, self.config = None, None

    def __call__(self, i: int, op, scale: float, dtype) -> dict:
        final = HFLayout.normalize(op, scale)
        got = (final.q_heads, final.k_heads, final.head_dim)
        if self.first is None:
            self.first = (i, got)
            self.config = self.new_config(*got)
            self.check_family(final)
        elif self.first[1] != got:
            raise RewriteError(f"non-uniform heads per layer: layer {self.first[0]} has (q, kv, head size) = "
                               f"{self.first[1]}, layer {i} has {got}; a Hugging Face config holds one head count "
                               "for every layer")
        return self.layout.to_tensors(i, final, dtype)

    def new_config(self, hq: int, hk: int, dh: int) -> dict:
        amap = getattr(self.cfg, "attribute_map", {}) or {}
        new = dict(self.ckpt.config)
        new[amap.get("num_attention_heads", "num_attention_heads")] = hq
        new[amap.get("num_key_value_heads", "num_key_value_heads")] = hk
        new["head_dim"] = dh
        return new

    def check_family(self, op) -> None:
        """Layer 0 built from the new config (meta device) must have the shapes about to be written."""
        small = dict(self.config, num_hidden_layers=1)
        if small.get("layer_types"):
            small["layer_types"] = small["layer_types"][:1]
        try:
            model = build_model(type(self.cfg).from_dict(small), meta=True)
        except Exception as e:  # noqa: BLE001 - the family's own validation, e.g. hidden size % heads
            raise RewriteError(f"{self.layout.family} cannot hold (q, kv, head size) = {self.first[1]}: its config "
                               f"rejects them: {str(e).strip().splitlines()[-1]}") from None
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for f, name in self.own_names.items():
            want = tuple(flat(f, getattr(op, f)).shape)
            if shapes.get(name) != want:
                raise RewriteError(f"{self.layout.family} built from the new config has {name} of shape "
                                   f"{shapes.get(name)}, the converted weights have {want}; this family cannot "
                                   "hold these head counts")

    def write_config(self, out_dir: str) -> None:
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config if self.config is not None else self.ckpt.config, f, indent=2, sort_keys=True)


