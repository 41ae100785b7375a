"""Custom-code Hugging Face classes for converted models whose result the stock config cannot express.

    RewriteLlamaConfig(LlamaConfig), model_type "rewrite_llama", with ``config.rewrite = {"sites": [...]}``
    RewriteLlamaForCausalLM(LlamaForCausalLM): the stock model, then every attention module swapped for a
    ``SiteAdapter`` around the canonical op its site spec describes (``install_sites``).

``family_classes(arch)`` makes (and registers with the Auto classes) the pair for any transformers class. The
folder's ``modeling_rewrite.py`` only calls it, so a folder loads with ``trust_remote_code=True`` wherever
rewrite is installed; ``register_on_demand()`` (run on ``import rewrite``) makes ``rewrite_*`` model types
known to ``AutoConfig`` on first use, so no flag is needed there.
"""
from __future__ import annotations

from torch import nn

__all__ = ["family_classes", "install_sites", "register_on_demand", "PREFIX", "AUTO_CLASSES"]

PREFIX = "rewrite_"
AUTO_CLASSES = {  # auto class -> its model-type -> class-name table
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
_CLASSES: dict = {}  # arch -> (config class, model class)
_CONFIGS: dict = {}  # stock config class -> its custom-code subclass


def auto_classes_of(arch: str, model_type: str) -> list:
    """The Auto classes under which transformers registers ``arch`` for ``model_type``."""
    from transformers.models.auto import modeling_auto

    out = []
    for auto, table in AUTO_CLASSES.items():
        names = getattr(modeling_auto, table, {}).get(model_type)
        if names == arch or (isinstance(names, (list, tuple)) and arch in names):
            out.append(auto)
    return out


def install_sites(model: nn.Module, rewrite: dict) -> None:
    """Swap each attention module named in ``rewrite["sites"]`` for an adapter around an empty canonical op."""
    from .hf_adapter import SiteAdapter
    from .site_spec import op_from_spec, plan_from_spec

    groups: dict = {}
    dtype = model.get_input_embeddings().weight.dtype  # from_pretrained(dtype=...) builds the base in it
    for site in rewrite["sites"]:
        op = op_from_spec(site["op"], groups)
        plan = plan_from_spec(site["plan"])
        model.set_submodule(plan.name, SiteAdapter(op, plan).to(dtype))
    declare_shared(model)


def declare_shared(model: nn.Module) -> None:
    """Tell transformers that parameters shared between sites (MASA's atoms) are one tensor: saved once,
    tied again on load."""
    import re

    first, pairs = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".op." in name:
            if id(p) in first:
                pairs[name] = first[id(p)]
            else:
                first[id(p)] = name
    if not pairs:
        return
    declared = dict(getattr(model, "_tied_weights_keys", None) or {})  # regexes, read when saving
    declared.update({re.escape(k): v for k, v in pairs.items()})
    model._tied_weights_keys = declared
    if getattr(model, "all_tied_weights_keys", None) is not None:  # read when loading
        model.all_tied_weights_keys.update(pairs)


def family_classes(arch: str):
    """(config class, model class) of the custom-code form of transformers' class ``arch``, made once."""
    if arch in _CLASSES:
        return _CLASSES[arch]
    import transformers

    base = getattr(transformers, arch)
    cfg_base = base.config_class
    model_type = PREFIX + cfg_base.model_type
    if cfg_base not in _CONFIGS:  # one config class per family, shared by its model classes
        _CONFIGS[cfg_base] = type(f"Rewrite{cfg_base.__name__}", (cfg_base,),
                                  {"model_type": model_type, "__module__": __name__})
        transformers.AutoConfig.register(model_type, _CONFIGS[cfg_base], exist_ok=True)
    config_cls = _CONFIGS[cfg_base]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        install_sites(self, config.rewrite)

    model_cls = type(f"Rewrite{arch}", (base,), {"config_class": config_cls, "__init__": __init__,
                                                  "__module__": __name__})
    for auto in auto_classes_of(arch, cfg_base.model_type):
        getattr(transformers, auto).register(config_cls, model_cls, exist_ok=True)
    _CLASSES[arch] = (config_cls, model_cls)
    return _CLASSES[arch]


class _OnDemand(dict):
    """``AutoConfig``'s table of registered types, which learns ``rewrite_<family>`` types when asked."""

    def _learn(self, key) -> bool:
        if not (isinstance(key, str) and key.startswith(PREFIX)) or dict.__contains__(self, key):
            return dict.__contains__(self, key)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

        family = key[len(PREFIX):]
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family) or MODEL_MAPPING_NAMES.get(family)
        if family not in CONFIG_MAPPING_NAMES or not isinstance(arch, str):
            return False
        for table in AUTO_CLASSES.values():  # every class of the family, so any Auto class finds its own
            from transformers.models.auto import modeling_auto

            name = getattr(modeling_auto, table, {}).get(family)
            if isinstance(name, str):
                family_classes(name)
        return dict.__contains__(self, key)

    def __contains__(self, key) -> bool:
        return self._learn(key)

    def __getitem__(self, key):
        self._learn(key)
        return dict.__getitem__(self, key)


def register_on_demand() -> None:
    """Let ``AutoConfig``/``AutoModel*`` resolve ``rewrite_*`` model types from this installed package."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    extra = getattr(CONFIG_MAPPING, "_extra_content", None)
    if isinstance(extra, dict) and not isinstance(extra, _OnDemand):
        CONFIG_MAPPING._extra_content = _OnDemand(extra)
