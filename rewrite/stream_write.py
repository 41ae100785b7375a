"""The Hugging Face folder of a streamed conversion, in the two forms ``hf_save.save_pretrained`` writes.

1. **Stock** when the family's config can hold every layer (``hf_checkpoint.Writeback``: plain softmax sites at
   their scale, K and V in equal groups, one head count for every layer): the q/k/v/o tensors are replaced
   in place and config.json gets the new head counts.
2. **Custom code** otherwise (per-layer head counts, DHA's separate K and V maps, gates, ...): every
   attention module's tensors become its ``SiteAdapter``'s (``model.layers.i.self_attn.op.wq``, ...), the
   config is ``hf_save.custom_config`` with each site's spec (``site_spec``) and the folder gets
   ``hf_save.write_remote_code``'s two files, exactly what ``save_pretrained`` writes for such a model.

Every other tensor is copied from the input shards (``shards.write_folder``). A layer's final op is kept in
the journal between the layer sweep and the write as its state dict (the checkpoint's dtype) and spec.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .errors import RewriteError
from .shards import write_folder

__all__ = ["save_op", "load_op", "write_output"]


def save_op(path: str, op, dtype) -> None:
    """``op``'s state dict (floats in ``dtype``) to ``path``.safetensors and its spec to ``path``.spec.json."""
    from .site_spec import op_spec

    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v).contiguous() for k, v in op.state_dict().items()}
    save_file(state, path + ".safetensors")
    with open(path + ".spec.json", "w", encoding="utf-8") as f:
        json.dump(op_spec(op, {}), f)


def load_op(path: str):
    from .site_spec import op_from_spec

    with open(path + ".spec.json", encoding="utf-8") as f:
        spec = json.load(f)
    spec["dtype"] = "float32"
    op = op_from_spec(spec, {})
    state = load_file(path + ".safetensors")
    op.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return op


def _stock_refusal(finish, n: int, op_of, scale_of, dtype) -> str:
    """Why the stock config cannot hold the converted layers ("" when it can); leaves ``finish`` fresh."""
    try:
        for i in range(n):
            finish(i, op_of(i), scale_of(i), dtype)
        return ""
    except RewriteError as e:
        return str(e)
    finally:
        finish.first, finish.config = None, None


def write_output(ckpt, tpl, finish, out_dir: str, op_of, pipeline: str) -> dict:
    """Write the folder (stock where possible, see the module docstring); returns sizes, kind and reason."""
    from .hf_remote import auto_classes_of
    from .hf_adapter import SiteAdapter
    from .hf_save import custom_config, write_remote_code
    from .site_spec import op_spec, plan_spec

    layout, n = tpl.layout, tpl.n_layers
    dtype = ckpt.dtype_of(layout.fields[0]["wq"])
    def scale_of(i: int) -> float:
        return tpl.ops[tpl.site_of[i]].scale

    reason = _stock_refusal(finish, n, op_of, scale_of, dtype)
    if not reason:
        sizes = write_folder(ckpt, out_dir, layout.layer_of(), lambda i: finish(i, op_of(i), scale_of(i), dtype))
        finish.write_config(out_dir)
        return {"sizes": sizes, "kind": "stock", "reason": None}
    if isinstance(tpl.plans, Exception):
        raise RewriteError(f"{reason}; and a custom-code folder cannot be written: {tpl.plans}")
    specs = {}

    def compute(i: int) -> dict:
        op = op_of(i)
        plan = dataclasses.replace(tpl.plans[tpl.site_of[i]], index=i, name=layout.site_names[i], layer_idx=i)
        adapter = SiteAdapter(op, plan)
        specs[i] = {"op": op_spec(op, {}), "plan": plan_spec(plan)}
        specs[i]["op"]["dtype"] = str(dtype).replace("torch.", "")
        return {f"{plan.name}.{k}": (v.detach().to(dtype) if v.is_floating_point() else v).contiguous()
                for k, v in adapter.state_dict().items()}

    sizes = write_folder(ckpt, out_dir, layout.layer_of(), compute)
    arch = tpl.family
    autos = auto_classes_of(arch, ckpt.config.get("model_type", "")) or ["AutoModel"]
    config = custom_config(dict(ckpt.config), arch, pipeline, [specs[i] for i in range(n)], autos)
    config.save_pretrained(out_dir)
    write_remote_code(out_dir, arch, pipeline)
    _check_custom(config, arch, out_dir, layout.site_names)
    return {"sizes": sizes, "kind": "custom", "reason": reason}


def _check_custom(config, arch: str, out_dir: str, site_names: list) -> None:
    """The attention tensors of the custom model built from ``config`` (meta device) are those written."""
    from .hf_remote import family_classes
    from .shards import read_header

    _, model_cls = family_classes(arch)
    with torch.device("meta"):
        model = model_cls(config)
    prefixes = tuple(name + "." for name in site_names)
    want = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}
    have = {}
    for f in os.listdir(out_dir):
        if f.endswith(".safetensors"):
            header, _ = read_header(os.path.join(out_dir, f))
            have.update({k: v["shape"] for k, v in header.items() if k.startswith(prefixes)})
    if want != have:
        odd = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise RewriteError(f"the custom-code model's attention tensors differ from those written: {odd[:3]}")
