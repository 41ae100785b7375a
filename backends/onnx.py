"""ONNX export of a converted model, checked in ONNX Runtime on inputs it was not traced with.

Every softmax site becomes one standard ONNX ``Attention`` node (opset 23)::

    Y = Attention(Q [B,Hq,Sq,dh], K [B,Hk,Sk,dh], V [B,Hk,Sk,dv]; q_num_heads=Hq, kv_num_heads=Hk, scale,
                  is_causal, attn_mask)          query head i reads kv head i // (Hq/Hk)

emitted by ``torch.onnx.ops.attention`` from ``Attention.core`` while ``torch.onnx.is_in_onnx_export()``,
so eager PyTorch (SDPA) and the exported graph compute the same function.

Cases handled:
 1. ``score_fn`` None, ``k_map == v_map`` in contiguous blocks (MHA, GQA, MQA): one ``Attention`` node
    with ``kv_num_heads = Hk`` (GQA stays native: K/V are never repeated in the graph).
 2. ``score_fn`` None, any other maps (DHA, K and V head counts that differ): K and V are gathered to
    ``Hq`` heads (``index_select`` → ``Gather``, or expand/reshape for contiguous blocks), then case 1
    with ``kv_num_heads = Hq``.
 3. ``score_fn`` / ``head_gate`` modules (clipped softmax, linear attention, gates, routers): exported
    through their ordinary torch ops.
 4. ONNX Runtime 1.23.0 computes GQA in ``Attention`` wrongly on CPU: with ``gqa="auto"`` case 1 falls
    back to case 2 (KV heads expanded), and the report says so.
 5. ``causal_chunks=n > 1`` and a causal self-attention site (``is_causal``, or a mask recognition saw
    hide every later key): ``n`` ``Attention`` nodes over query chunks, each reading only the keys up
    to its last query (≈ (n+1)/2n of the work; ONNX Runtime's CPU kernel computes masked blocks too).
Refused: ``gqa="native"`` checked with a runtime known to compute it wrongly (``BackendError``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Optional

import numpy as np
import torch

from rewrite.errors import BackendError

from .onnx_moe import translations

__all__ = ["export_onnx", "attention_node", "export_graph", "check_file", "onnx_summary"]
log = logging.getLogger(__name__)

TWO_GB = 2 * 1024 ** 3
_state = {"native_gqa": True, "causal_chunks": 1}  # read by attention_node while an export runs


def attention_node(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """The softmax core of ``op`` as ONNX ``Attention`` node(s); ``(B, Hq, Sq, dv)``."""
    native = (_state["native_gqa"] and op._k_group is not None and op._v_group is not None
              and op.k_heads == op.v_heads)
    if not native:  # (B, Hk, S, d) -> (B, Hq, S, d): Gather for arbitrary maps
        k = op._expand(k, op.k_map, op._k_group)
        v = op._expand(v, op.v_map, op._v_group)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # ONNX wants an additive mask in Q's type
    causal = op.causal if mask is None else op.info.causal_mask
    if _state["causal_chunks"] > 1 and causal and not op.info.cross and op.sink_logits is None:
        return _causal_chunks(op, q, k, v, mask, _state["causal_chunks"])
    return _attention(op, q, k, v, mask, is_causal=bool(op.causal and mask is None))


def _attention(op, q, k, v, mask, is_causal: bool = False) -> torch.Tensor:
    y, _, _, _ = torch.onnx.ops.attention(q, k, v, attn_mask=mask, is_causal=is_causal, q_num_heads=op.q_heads,
                                          kv_num_heads=k.shape[1], scale=op.scale, softcap=op.softcap)
    return y


def _causal_chunks(op, q, k, v, mask, n: int) -> torch.Tensor:
    """Causal attention as ``n`` query chunks, chunk ``[lo, hi)`` reading keys ``[0, hi)`` only.

        Y[lo:hi] = Attention(Q[lo:hi+1], K[:hi+1], V[:hi+1], M[lo:hi+1, :hi+1])[:hi-lo]

    Same result (the keys left out are hidden from those queries), ≈ (n+1)/2n of the score and value
    work: ONNX Runtime's CPU kernel computes every block of the score matrix, masked or not. Each chunk
    also takes row ``hi`` so that none is empty for sequences shorter than ``n``; that row is dropped.
    ``M`` is the site's mask, or the causal triangle when the site has none.
    """
    s = q.shape[2]
    outs = []
    for i in range(n):
        lo, hi = i * s // n, (i + 1) * s // n
        qi, ki, vi = q[:, :, lo:hi + 1], k[:, :, :hi + 1], v[:, :, :hi + 1]
        if mask is not None:
            mi = mask[..., lo:hi + 1, :hi + 1]
        else:  # bottom-right triangle: query lo + r sees keys [0, lo + r]
            rows = torch.arange(qi.shape[2], device=q.device)[:, None] + lo
            mi = torch.arange(ki.shape[2], device=q.device)[None, :] <= rows
        y = _attention(op, qi, ki, vi, mi)
        outs.append(y[:, :, :hi - lo] if i < n - 1 else y)
    return torch.cat(outs, dim=2)


@contextlib.contextmanager
def _export_mode(native_gqa: bool, causal_chunks: int = 1):
    """The GQA choice for the duration of one export (restored afterwards), export chatter silenced.

    The captured graph module was traced in eval mode; its ``eval()`` is not callable (torch.export),
    hence the training-mode warning is dropped too.
    """
    before = dict(_state)
    quiet = [logging.getLogger("torch.onnx._internal.exporter._registration"),  # "torchvision is not installed"
             logging.getLogger("onnx_ir._convenience")]  # "Attribute type is ambiguous" (empty ints, MoE translation)
    levels = [log.level for log in quiet]
    _state.update(native_gqa=native_gqa, causal_chunks=int(causal_chunks))
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*training mode.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        _state.update(before)
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def _param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def has_native_gqa(conv) -> bool:
    """True when some softmax site would export with fewer KV heads than query heads (case 1)."""
    return any(op.score_fn is None and op._k_group not in (None, 1) and op._v_group is not None
               and op.k_heads == op.v_heads for op in conv.sites)


def export_graph(conv, path: str, opset: int = 23, native_gqa: bool = True,
                 external_data: Optional[bool] = None, causal_chunks: int = 1) -> bool:
    """Write ``conv.gm`` to ``path`` with dynamic batch/sequence axes; returns whether weights are external.

    ``causal_chunks > 1`` splits each causal site into that many query chunks (see ``_causal_chunks``).
    """
    if not isinstance(causal_chunks, int) or causal_chunks < 1:
        raise BackendError(f"causal_chunks={causal_chunks!r}: expected an int >= 1 (1 = one Attention node per site)")
    from torch.export import Dim

    kw = {**conv.example_inputs, **conv.fixed}
    dyn = {k: ({d: Dim.AUTO for d in conv.dim_symbols.get(k, {})} or None) if isinstance(v, torch.Tensor)
           else None for k, v in kw.items()}
    if external_data is None:
        external_data = _param_bytes(conv.gm) > TWO_GB * 0.9  # protobuf's 2 GB limit covers the graph too
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with _export_mode(native_gqa, causal_chunks):
        save_export(conv.gm, (), path, opset, external_data, BackendError, "ONNX export", kwargs=kw, dynamic_shapes=dyn)
    return external_data


def save_export(module, args: tuple, path: str, opset: int, external: bool, error, what: str, **export_kwargs) -> None:
    """``torch.onnx.export`` (dynamo) of ``module(*args)`` saved to ``path`` and tidied; a failure is raised as
    ``error`` naming ``what`` and the exporter's first line."""
    with torch.no_grad():
        try:
            program = torch.onnx.export(module, args, None, dynamo=True, opset_version=opset, verbose=False,
                                        external_data=external, custom_translation_table=translations(),
                                        **export_kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
            raise error(f"{what} (opset {opset}) failed: {root_cause(e)}") from e
    program.save(path, external_data=external)
    _tidy_file(path, fold=not external)


def root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost exception in the chain (the exporter wraps the real reason in
    "Failed to convert ... step 3/3")."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or (e.__context__ if not e.__suppress_context__ else None)
    parts = []
    for x in (seen[0], seen[-1]) if len(seen) > 1 else seen[:1]:
        lines = [ln for ln in str(x).strip().splitlines() if ln.strip()]
        parts.append(f"{type(x).__name__}: {lines[0][:300] if lines else ''}")
    return parts[0] if len(parts) == 1 else f"{parts[0]} Cause: {parts[1]}"


def write_file(conv, path: str, opset: int = 23, native_gqa: bool = True, external_data: Optional[bool] = None,
               causal_chunks: int = 1, quantize: Optional[str] = None) -> dict:
    """Export ``conv`` to ``path`` (quantized when asked: fp32 first, at ``*.fp32.onnx``); the file's facts."""
    extra = {}
    if quantize:
        from .ort_session import quantize_int8

        fp32 = os.path.splitext(path)[0] + ".fp32.onnx"
        external = export_graph(conv, fp32, opset, native_gqa, external_data, causal_chunks)
        extra = {"quantize": quantize, "quantized_matmuls": quantize_int8(fp32, path), "fp32_path": os.path.abspath(fp32)}
    else:
        external = export_graph(conv, path, opset, native_gqa, external_data, causal_chunks)
    gqa = ("native" if native_gqa else "expanded") if has_native_gqa(conv) else "none"
    return {"path": os.path.abspath(path), "opset": opset, "external_data": external, "causal_chunks": causal_chunks,
            "gqa": gqa, **extra, **onnx_summary(path)}


def _tidy_file(path: str, fold: bool) -> None:
    """Fix the exporter's RoPE caches and fold weight layouts in the saved file (rewritten if changed)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    changed = _broadcast_rope_caches(model.graph)
    if fold:
        changed = _fold_weight_layouts(model.graph) > 0 or changed
    if changed:
        onnx.save(model, path)


def _fold_weight_layouts(graph) -> int:
    """``Reshape``/``Transpose`` of a stored weight become a stored weight; the number folded.

        MatMul(x, Transpose(Reshape(W, shape)))  ->  MatMul(x, W')   with W' computed once

    The canonical op keeps per-head weights ``[H, d, D]``; the exporter writes the layout ops out, which
    runtimes fold on load but quantizers and other tools do not: they look for ``MatMul(x, W)``. The
    originals are dropped when nothing else reads them, so the file does not grow. Computed weights
    (MASA atoms) are left alone: only layout ops are folded.
    """
    from collections import Counter

    from onnx import helper, numpy_helper

    stored = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    readers = Counter(i for n in graph.node for i in n.input) + Counter(o.name for o in graph.output)
    folded, added, gone, dropped = 0, [], set(), set()
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Reshape", "Transpose") or node.input[0] not in stored:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Reshape":
            shape = next((numpy_helper.to_array(stored[n]) if n in stored else consts.get(n)
                          for n in node.input[1:2]), None)
            if shape is None:  # computed at run time: not a layout of the weight alone
                continue
        w = numpy_helper.to_array(stored[node.input[0]])
        if node.op_type == "Transpose":
            w = w.transpose(attrs.get("perm") or list(range(w.ndim))[::-1])
        else:
            if not attrs.get("allowzero", 0):
                shape = [w.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            w = w.reshape([int(d) for d in shape])
        new = numpy_helper.from_array(np.ascontiguousarray(w), node.output[0])
        stored[new.name] = new
        added.append(new)
        gone.add(index)
        for name in node.input:
            readers[name] -= 1
            if readers[name] == 0 and name in stored:
                dropped.add(name)
        folded += 1
    if folded:  # rebuilt once: removing from protobuf lists one by one is quadratic
        kept_nodes = [n for i, n in enumerate(graph.node) if i not in gone]
        kept_weights = [t for t in graph.initializer if t.name not in dropped] + [t for t in added if t.name not in dropped]
        del graph.node[:]
        graph.node.extend(kept_nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept_weights)
    return folded


def _broadcast_rope_caches(graph) -> bool:
    """Expand the cos/sin inputs of fused ``RotaryEmbedding`` nodes to the batch of ``x``.

    The exporter's opset-23 fusion feeds HF's ``(1, S, d/2)`` caches straight into ``RotaryEmbedding``,
    whose spec (and ONNX Runtime) wants ``(B, S, d/2)`` when no position ids are given: such files fail
    for batch > 1. ``Expand(cache, [B, 1, 1])`` fixes that and is a no-op when the batch is already there.
    """
    from onnx import helper, numpy_helper

    ropes = [n for n in graph.node if n.op_type == "RotaryEmbedding" and (len(n.input) < 4 or not n.input[3])]
    if not ropes:
        return False
    ones = "rewrite_rope_ones"
    graph.initializer.append(numpy_helper.from_array(np.array([1, 1], dtype=np.int64), ones))
    nodes = []
    for n in graph.node:
        if n in ropes:
            x, tag = n.input[0], n.name or n.output[0]
            batch, shape = f"{tag}_batch", f"{tag}_cache_shape"
            nodes += [helper.make_node("Shape", [x], [batch], start=0, end=1),
                      helper.make_node("Concat", [batch, ones], [shape], axis=0)]
            for i in (1, 2):
                out = f"{n.input[i]}_{tag}_expanded"
                nodes.append(helper.make_node("Expand", [n.input[i], shape], [out]))
                n.input[i] = out
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def onnx_summary(path: str) -> dict:
    """Node counts of an ONNX file: all nodes, Attention nodes and their head attributes."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    attention = [n for n in nodes if n.op_type == "Attention"]

    def attr(node, name):
        return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)

    return {"nodes": len(nodes), "attention_nodes": len(attention),
            "q_num_heads": [attr(n, "q_num_heads") for n in attention],
            "kv_num_heads": [attr(n, "kv_num_heads") for n in attention],
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}


def fresh_inputs(conv) -> dict:
    """Example inputs at another batch size and sequence length (every dynamic dim changed)."""
    from rewrite.capture import resize_inputs

    cap = getattr(conv, "_captured", None)
    if cap is None or not cap.symbol_sizes:
        return dict(conv.example_inputs)
    return resize_inputs(cap, conv.example_inputs, grow=1)


def check_file(conv, session, inputs: Optional[dict] = None) -> dict:
    """Run ``session`` and ``conv`` (PyTorch) on ``inputs`` (fresh ones by default); the max error."""
    from torch.utils import _pytree as pytree

    from .ort_session import run_session

    inputs = fresh_inputs(conv) if inputs is None else inputs
    with torch.no_grad():
        expected = [t for t in pytree.tree_leaves(conv.gm(**inputs, **conv.fixed)) if isinstance(t, torch.Tensor)]
    got = run_session(session, inputs)
    if len(got) != len(expected):
        raise BackendError(f"the ONNX graph has {len(got)} outputs but the PyTorch model returns "
                           f"{len(expected)} tensors")
    err = 0.0
    for a, b in zip(got, expected):
        if tuple(a.shape) != tuple(b.shape):
            raise BackendError(f"ONNX Runtime returned shape {tuple(a.shape)} where PyTorch returns "
                               f"{tuple(b.shape)}")
        if a.numel():
            err = max(err, (a.double() - b.detach().cpu().double()).abs().max().item())
    shapes = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return {"max_abs_err": err, "checked_inputs": shapes}


def choose_gqa(conv, gqa: str, provider: str, check: bool) -> tuple:
    """(native_gqa, note): whether GQA stays native in the file, and why not when it does not."""
    from .ort_session import attention_problem

    if gqa not in ("auto", "native", "expand"):
        raise BackendError(f"gqa={gqa!r}: expected 'auto', 'native' or 'expand'")
    if gqa == "expand" or not has_native_gqa(conv):
        return False if gqa == "expand" else True, ""
    ops = conv.sites
    problem = attention_problem(provider, gqa=True, dtype=ops[0].wq.dtype,
                                masked=any(op.info.mask_kind for op in ops))
    if problem is None:
        return True, ""
    if gqa == "native" and check:
        raise BackendError(f"refusing to check native GQA: {problem}. Upgrade onnxruntime, or export with "
                           f"gqa='expand' (KV heads repeated in the graph)")
    if gqa == "native":
        return True, f"warning: {problem}"
    return False, f"GQA exported with KV heads expanded to the query heads: {problem}"


def export_onnx(conv, path: str, opset: int = 23, check: bool = True, external_data: Optional[bool] = None,
                gqa: str = "auto", provider: str = "CPUExecutionProvider", causal_chunks: int = 1,
                quantize: Optional[str] = None) -> dict:
    """Export ``conv`` (a ``rewrite.Converted``) to ``path`` and check it in ONNX Runtime.

    Args:
        conv: the converted model.
        path: the ``.onnx`` file to write (weights go to ``path + '.data'`` when external).
        opset: ONNX opset; 23 or newer gives the standard ``Attention`` op.
        check: run the file in ONNX Runtime on fresh inputs (another batch and sequence length)
            and record the max abs error against PyTorch.
        external_data: weights in a side file; default: only for models over 2 GB.
        gqa: "auto" (native GQA unless the installed runtime computes it wrongly), "native", "expand".
        provider: the ONNX Runtime execution provider used for the check.
        causal_chunks: split causal sites into this many query chunks that skip the hidden key blocks
            (faster on ONNX Runtime's CPU kernel, which computes them all; 8 is a good choice there).
        quantize: None, or "int8": ``path`` holds the weight matmuls quantized dynamically
            (``rewrite.backends.ort_session.quantize_int8``; lossy: the check measures the error).
    Returns:
        the summary also stored in ``conv.report.extras["onnx"]``.
    """
    t0 = time.perf_counter()
    if opset < 23:
        log.warning("opset %d has no standard Attention op: attention is exported as MatMul/Softmax", opset)
    from .ort_session import check_quantize

    check_quantize(quantize)
    native, note = choose_gqa(conv, gqa, provider, check)
    info = {**write_file(conv, path, opset, native, external_data, causal_chunks, quantize), "opset": opset}
    if note:
        info["note"] = note
    if check:
        import onnxruntime

        from .ort_session import make_session

        session = make_session(path, provider)
        info.update(check_file(conv, session))
        info["provider"] = session.get_providers()[0]
        info["onnxruntime"] = onnxruntime.__version__
    info["seconds"] = round(time.perf_counter() - t0, 3)
    conv.report.extras["onnx"] = info
    return info
