"""Run a checkpoint's decoder layers one at a time on calibration hidden states (for ``rewrite.stream_calib``).

- ``LayerInputs``: the calibration batches embedded (the checkpoint's embedding, nothing else loaded) and,
  per batch and template layer, the keyword arguments the model gives its decoder layers (rotary tables,
  masks, positions), read off the template model (tiny vocabulary and MLP, real attention shapes) whose
  layers are stand-ins that record their arguments.
- ``DecoderLayers``: layer i built from the config on the meta device, its tensors read from the shards
  (in the compute dtype: fp32, or bf16 for speed), its attention module replaced by a ``hf_adapter.SiteAdapter`` around any canonical op, so the
  same layer runs with the original or the converted attention.
- ``HiddenStore``: per stream, two sides (layer i reads side i mod 2, writes the other) of every batch's
  ``[B, S, D]`` fp32 hidden states, in one memory-mapped file each (or RAM), so a resumed conversion finds
  the inputs of its next layer.
- ``one_site_graph``: a graph ``(x, kv, mask, *side) -> op(...)`` holding one site, so a pass runs its own
  statistics code (``calibrate.input_grams``, ``importance``) on that site's recorded inputs.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .calibrate import ONE_SITE
from .errors import RewriteError
from .graph import SITES
from .hf_checkpoint import SiteTemplate, build_model

__all__ = ["LayerInputs", "DecoderLayers", "HiddenStore", "one_site_graph", "site_batches"]


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: keeps the arguments it gets, returns the hidden states unchanged."""

    def __init__(self, original: nn.Module, last: bool):
        super().__init__()
        self.last, self.seen = last, None
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, *args, **kwargs):
        self.seen = (args, kwargs)
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


def _split(name: str, j: int) -> tuple:
    """("model.layers", "self_attn") of template site j's module path "model.layers.j.self_attn"."""
    parts = name.split(".")
    k = len(parts) - 1 - parts[::-1].index(str(j))
    return ".".join(parts[:k]), ".".join(parts[k + 1:])


class LayerInputs:
    """Embedded calibration batches and the per-batch keyword arguments of every template layer."""

    def __init__(self, ckpt, tpl: SiteTemplate, batches: list):
        keep = len(tpl.ops)
        self.list_path, self.attn_path = _split(tpl.ops[0].info.name, 0)
        model = build_model(SiteTemplate.shrunk(tpl.cfg, keep))
        layers = model.get_submodule(self.list_path)
        self.layer_class = type(layers[0])
        for j in range(keep):
            layers[j] = _Recorder(layers[j], j == keep - 1)
        emb = model.get_input_embeddings()
        name = next(n for n, p in model.named_parameters() if p is emb.weight)
        emb.weight = nn.Parameter(next(iter(ckpt.load([ckpt.resolve(name)]).values())).float(), requires_grad=False)
        self.hidden, self.kwargs = [], []  # per batch: [B, S, D]; per batch and template layer: kwargs
        with torch.no_grad():
            for b in batches:
                try:
                    model(**b, use_cache=False)
                except _Stop:
                    pass
                seen = [layers[j].seen for j in range(keep)]
                args0, _ = seen[0]
                self.hidden.append(args0[0] if args0 else seen[0][1]["hidden_states"])
                self.kwargs.append([{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in seen])
        del model, layers, emb


class DecoderLayers:
    """Decoder layer i of the checkpoint, its attention an adapter around a given canonical op."""

    def __init__(self, ckpt, tpl: SiteTemplate, inputs: LayerInputs, dtype: torch.dtype = torch.float32):
        if isinstance(tpl.plans, Exception):
            raise RewriteError(f"{tpl.family}: calibrated streaming runs the decoder layers, and cannot place the "
                               f"canonical op in the attention module: {tpl.plans}")
        self.ckpt, self.tpl, self.inputs, self.dtype = ckpt, tpl, inputs, dtype

    def weights(self, i: int) -> dict:
        """Layer i's tensors other than its attention module's (in the compute dtype), by name inside the layer."""
        with torch.device("meta"):
            layer = self.inputs.layer_class(self.tpl.cfg, i)
        names = [k for k in layer.state_dict() if not k.startswith(self.inputs.attn_path + ".")]
        prefix = f"{self.inputs.list_path}.{i}."
        full = {k: self.ckpt.resolve(prefix + k) for k in names}
        raw = self.ckpt.load(list(full.values()))
        return {k: raw[n].to(self.dtype) for k, n in full.items()}

    def _kwargs(self, b: int, j: int) -> dict:
        """Batch b's keyword arguments of template layer j, their float tensors in the compute dtype."""
        kw = self.inputs.kwargs[b][j]
        return kw if self.dtype == torch.float32 else _cast_floats(kw, self.dtype)

    def build(self, i: int, weights: dict, op) -> nn.Module:
        from .hf_adapter import SiteAdapter

        with torch.device("meta"):
            layer = self.inputs.layer_class(self.tpl.cfg, i)
        plan = self.tpl.plans[self.tpl.site_of[i]]
        layer.set_submodule(self.inputs.attn_path, SiteAdapter(op, plan))
        missing, unexpected = layer.load_state_dict(weights, strict=False, assign=True)
        missing = [k for k in missing if not k.startswith(self.inputs.attn_path + ".")]
        if missing or unexpected:
            raise RewriteError(f"layer {i}: the checkpoint's tensors do not fit {self.inputs.layer_class.__name__} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return layer.eval()

    def run(self, i: int, weights: dict, op, store: "HiddenStore", stream: int, record: bool) -> list:
        """Layer i (attention ``op``) on every batch of ``stream``: writes the outputs to the other side.

        Returns the site inputs (x, kv, mask, *side) per batch when ``record``, as fp32 whatever the compute
        dtype (a bf16 forward records its bf16 values, widened), so the passes' statistics stay fp32."""
        fast = op if self.dtype == torch.float32 else copy.deepcopy(op).to(self.dtype)
        layer = self.build(i, weights, fast)
        records = []
        hook = fast.register_forward_hook(lambda m, a, o: records.append(_widen(a))) if record else None
        j = self.tpl.site_of[i]
        try:
            with torch.no_grad():
                for b in range(store.n_batches):
                    out = layer(store.get(stream, i, b).to(self.dtype), **self._kwargs(b, j))
                    store.put(stream, i, b, out[0] if isinstance(out, tuple) else out)
        finally:
            if hook is not None:
                hook.remove()
        return records


def _cast_floats(tree, dtype: torch.dtype):
    """Every float tensor in ``tree`` (rotary tables, an additive mask) in ``dtype``, the rest as it is."""
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                           tree)


def _widen(args: tuple) -> tuple:
    """``args`` with low-precision float tensors as fp32 (one copy per distinct tensor: x is often kv too)."""
    done = {}
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32 and id(a) not in done:
            done[id(a)] = a.float()
    return tuple(done.get(id(a), a) for a in args)


class HiddenStore:
    """Calibration hidden states: per stream two sides, each every batch's ``[B, S, D]`` (fp32)."""

    def __init__(self, shapes: list, streams: int, folder=None):
        self.shapes, self.n_batches, self.streams = shapes, len(shapes), streams
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.offsets = [sum(self.sizes[:b]) for b in range(len(shapes))]
        self.per_side = sum(self.sizes)
        self.folder = folder
        self.data = []
        for s in range(streams):
            sides = []
            for side in range(2):
                if folder is None:
                    sides.append(torch.zeros(self.per_side))
                else:
                    path = os.path.join(folder, f"hidden-{s}-{side}.f32")
                    if not os.path.exists(path):
                        with open(path, "wb") as f:
                            f.truncate(self.per_side * 4)
                    sides.append(torch.from_file(path, shared=True, size=self.per_side, dtype=torch.float32))
            self.data.append(sides)

    @staticmethod
    def bytes_needed(shapes: list, streams: int) -> int:
        return 2 * streams * 4 * sum(int(torch.Size(s).numel()) for s in shapes)

    def _view(self, stream: int, side: int, b: int) -> torch.Tensor:
        o = self.offsets[b]
        return self.data[stream][side][o:o + self.sizes[b]].view(self.shapes[b])

    def get(self, stream: int, layer: int, b: int) -> torch.Tensor:
        """Batch b's input to ``layer``."""
        return self._view(stream, layer % 2, b)

    def put(self, stream: int, layer: int, b: int, value: torch.Tensor) -> None:
        """Batch b's output of ``layer`` (the next layer's input)."""
        self._view(stream, (layer + 1) % 2, b).copy_(value)

    def fill(self, stream: int, hidden: list) -> None:
        for b, h in enumerate(hidden):
            self._view(stream, 0, b).copy_(h)


def one_site_graph(op, n_args: int) -> fx.GraphModule:
    """``(x, kv, mask, side0, ...) -> op(x, kv, mask, side0, ...)``: a graph holding the one site ``op``."""
    g = fx.Graph()
    nodes = [g.placeholder(n) for n in _arg_names(n_args)]
    g.output(g.call_module(f"{SITES}.0", tuple(nodes)))
    root, holder = nn.Module(), nn.Module()
    holder.add_module("0", op)
    root.add_module(SITES, holder)
    gm = fx.GraphModule(root, g)
    gm.meta[ONE_SITE] = True  # calibration that reads only the site's inputs need not run it
    return gm


def _arg_names(n: int) -> list:
    return ["x", "kv", "mask"] + [f"side{k}" for k in range(n - 3)]


def site_batches(records: list) -> list:
    """The recorded site inputs as calibration batches of ``one_site_graph``."""
    return [dict(zip(_arg_names(len(r)), r)) for r in records]
