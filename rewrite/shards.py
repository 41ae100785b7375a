"""Hugging Face safetensors folders: read headers and single tensors; write shards tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape and
data_offsets relative to the data start) and the raw bytes. Writing needs only the shapes up front, so an
output shard is written from the tensors that changed (in memory) and every other tensor copied from the
input file in chunks: a whole shard is never held in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from typing import Callable

import torch

from .errors import RewriteError

__all__ = ["Checkpoint", "write_shard", "write_folder", "DTYPES", "JOURNAL", "COMPLETE"]

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
CHUNK = 64 << 20
JOURNAL = ".rewrite-journal"  # in a conversion's temporary folder until it is complete
COMPLETE = "rewrite-complete.json"  # written last into a finished conversion's folder


def read_header(path: str):
    """(header dict, offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


class Checkpoint:
    """A Hugging Face model folder: its config and where each tensor lives (headers only, nothing loaded)."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise RewriteError(f"{folder} is not a folder; expected a Hugging Face model folder")
        if os.path.isdir(os.path.join(folder, JOURNAL)) and not os.path.isfile(os.path.join(folder, COMPLETE)):
            raise RewriteError(f"{folder} is an unfinished conversion (it holds {JOURNAL}/ and no completion mark "
                               f"{COMPLETE}); rerun the same conversion to finish it, or delete the folder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise RewriteError(f"{folder} has no config.json; expected a Hugging Face model folder")
        self.folder = folder
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            self.config = json.load(f)
        self.index = None
        if os.path.isfile(os.path.join(folder, INDEX)):
            with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
                self.index = json.load(f)
            listed = self.index.get("weight_map", {})
            files = sorted(set(listed.values()))
        elif os.path.isfile(os.path.join(folder, SINGLE)):
            listed, files = {}, [SINGLE]
        else:
            other = sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_FILES))
            raise RewriteError(f"{folder} has neither {SINGLE} nor {INDEX}"
                               + (f" (found {', '.join(other)}; streaming reads safetensors only: load and "
                                  "save_pretrained it once to convert)" if other else ""))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise RewriteError(f"{folder}: shard {missing[0]} listed in {INDEX} is missing"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.files = files
        self.headers = {f: read_header(os.path.join(folder, f)) for f in files}
        self.where = {n: f for f in files for n in self.headers[f][0] if n != "__metadata__"}
        wrong = [n for n, f in listed.items() if self.where.get(n) != f]
        if wrong:
            raise RewriteError(f"{folder}: {INDEX} puts {wrong[0]} in {listed[wrong[0]]}, but that shard does "
                               "not hold it")
        sizes = Counter()
        for n, f in self.where.items():
            e = self.entry(n)
            sizes[e["dtype"]] += e["data_offsets"][1] - e["data_offsets"][0]
        floats = [d for d, _ in sizes.most_common() if d in ("BF16", "F16", "F32", "F64")]
        self.dtype = DTYPES[floats[0]] if floats else torch.float32

    def entry(self, name: str) -> dict:
        return self.headers[self.where[name]][0][name]

    def dtype_of(self, name: str) -> torch.dtype:
        return DTYPES[self.entry(name)["dtype"]]

    def numel(self) -> int:
        total = 0
        for n in self.where:
            shape = self.entry(n)["shape"]
            total += int(torch.tensor(shape).prod()) if shape else 1
        return total

    def resolve(self, name: str) -> str:
        """The checkpoint's name for a model parameter name (prefixes such as ``model.`` may differ)."""
        if name in self.where:
            return name
        parts = name.split(".")
        for k in range(1, len(parts) - 1):
            if ".".join(parts[k:]) in self.where:
                return ".".join(parts[k:])
        longer = [n for n in self.where if n.endswith("." + name)]
        if len(longer) == 1:
            return longer[0]
        raise RewriteError(f"{self.folder}: the checkpoint has no tensor {name}")

    def load(self, names: list) -> dict:
        """Just these tensors, each read from its shard."""
        from safetensors import safe_open

        out = {}
        for f in sorted({self.where[n] for n in names}):
            with safe_open(os.path.join(self.folder, f), framework="pt") as handle:
                for n in names:
                    if self.where[n] == f:
                        out[n] = handle.get_tensor(n)
        return out


def write_shard(dst: str, src: str, header: dict, start: int, replaced: dict, dropped=(), added=None):
    """Write ``src``'s tensors to ``dst`` in their order, with ``replaced`` (name -> tensor) swapped in,
    ``dropped`` names left out and ``added`` (name -> tensor) appended.

    Returns (data bytes, element count).
    """
    names = sorted((n for n in header if n != "__metadata__" and n not in dropped),
                   key=lambda n: header[n]["data_offsets"][0])
    replaced = dict(replaced, **(added or {}))
    names += list(added or {})
    out, offset, numel = {}, 0, 0
    if header.get("__metadata__"):
        out["__metadata__"] = header["__metadata__"]
    for n in names:
        if n in replaced:
            t = replaced[n]
            dtype, shape, size = _NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()
        else:
            a, b = header[n]["data_offsets"]
            dtype, shape, size = header[n]["dtype"], header[n]["shape"], b - a
        out[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        numel += int(torch.tensor(shape).prod()) if shape else 1
    blob = json.dumps(out, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dst, "wb") as w, open(src, "rb") as r:
        w.write(struct.pack("<Q", len(blob)) + blob)
        for n in names:
            if n in replaced:
                w.write(replaced[n].contiguous().reshape(-1).view(torch.uint8).numpy().data)
                continue
            a, b = header[n]["data_offsets"]
            r.seek(start + a)
            left = b - a
            while left:
                buf = r.read(min(CHUNK, left))
                if not buf:
                    raise RewriteError(f"{src} ends inside tensor {n}")
                w.write(buf)
                left -= len(buf)
    return offset, numel


def side_files(folder: str) -> list:
    """The files of a model folder other than its weights, their index, config.json and the completion mark
    (tokenizer, generation config, custom code): what a folder written from it copies."""
    return [f for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))
            and not f.endswith(WEIGHT_FILES + (".index.json",)) and f not in ("config.json", COMPLETE)]


def publish(tmp: str, out_dir: str, mark: dict = None) -> None:
    """Make the finished folder ``tmp`` into ``out_dir`` (replacing an older one) in one rename, its journal
    removed and, when given, the completion mark ``mark`` written first."""
    shutil.rmtree(os.path.join(tmp, JOURNAL), ignore_errors=True)
    if mark is not None:
        with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as f:
            json.dump(mark, f, indent=2)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def write_folder(ckpt: Checkpoint, out_dir: str, layer_of: dict, compute: Callable[[int], dict]) -> list:
    """Write every shard of ``ckpt`` to ``out_dir``; tensors of layer i come from ``compute(i)``.

    ``layer_of`` maps each replaced tensor name to its layer. A layer is computed when its first tensor's
    shard is written and kept only until its last tensor is; names ``compute`` gives that the input does not
    have go into that shard, and the layer's input names it does not give are left out. Side files
    (tokenizer, generation config) are copied; config.json is the caller's. Files written here are removed
    again if anything fails. Returns the data bytes of each shard.
    """
    os.makedirs(out_dir, exist_ok=True)
    written, pending, done, sizes, numel = [], {}, set(), [], 0
    weight_map = dict((ckpt.index or {}).get("weight_map", {}))
    try:
        for fname in ckpt.files:
            header, start = ckpt.headers[fname]
            names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
            added = {}
            for n in names:
                i = layer_of.get(n)
                if i is not None and i not in done:
                    done.add(i)
                    out = compute(i)
                    added.update({k: v for k, v in out.items() if k not in ckpt.where})
                    pending.update({k: v for k, v in out.items() if k in ckpt.where})
            replaced = {n: pending.pop(n) for n in names if n in pending}
            dropped = {n for n in names if n in layer_of and n not in replaced}
            for n in dropped:
                weight_map.pop(n, None)
            weight_map.update({k: fname for k in added})
            written.append(os.path.join(out_dir, fname))
            size, count = write_shard(written[-1], os.path.join(ckpt.folder, fname), header, start, replaced,
                                      dropped, added)
            sizes.append(size)
            numel += count
        if ckpt.index is not None:
            index = dict(ckpt.index, weight_map=weight_map)
            index["metadata"] = dict(index.get("metadata") or {}, total_size=sum(sizes))
            if "total_parameters" in index["metadata"]:
                index["metadata"]["total_parameters"] = numel
            written.append(os.path.join(out_dir, INDEX))
            with open(written[-1], "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        for f in side_files(ckpt.folder):
            written.append(os.path.join(out_dir, f))
            shutil.copy2(os.path.join(ckpt.folder, f), written[-1])
    except BaseException:
        for path in written:
            if os.path.isfile(path):
                os.remove(path)
        raise
    return sizes
