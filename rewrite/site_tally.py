"""Report rows for conversions that never hold the whole model: per-site numbers, no weights kept.

For each layer and stage, ``SiteTally.add`` runs the stage's op and the original op on the template's
recorded attention inputs (random-weight activations, batch 2 × 8 tokens) and keeps heads, KV bytes,
parameters, attention FLOPs and the error against the original; exact passes must match to 1e-5
relative there. These are per-site errors, not whole-model output errors (the report's extras say so).
"""
from __future__ import annotations

import torch

from .errors import VerificationError
from .hf_checkpoint import FIELDS, Writeback
from .report import Stage
from .shards import Checkpoint

__all__ = ["SiteTally", "streaming_extras", "EXACT_TOL", "FLOP_TOKENS"]

EXACT_TOL = 1e-5
FLOP_TOKENS = 1024  # attention FLOPs in the report are for one sequence of this length


class SiteTally:
    """Per stage and layer, the numbers a report row needs (weights are not kept)."""

    def __init__(self, pipeline: list, args: list, dtype_bytes: int):
        self.pipeline, self.args, self.bytes = pipeline, args, dtype_bytes
        n = len(pipeline) + 1
        self.rows, self.diags, self.stats, self.seconds = [[] for _ in range(n)], [[] for _ in range(n)], \
            [{} for _ in range(n)], [0.0] * n

    def add(self, i: int, j: int, ops: list) -> None:
        """Layer i (template site j) after each stage: ops[0] is the original. Exact passes are checked."""
        with torch.no_grad():
            ref = ops[0](*self.args[j]).double()
            for s, op in enumerate(ops):
                out = ref if s == 0 else op(*self.args[j]).double()
                numel = sum(getattr(op, f).numel() for f in FIELDS if getattr(op, f) is not None)
                err, scale = float((ref - out).abs().max()), float(ref.abs().max())
                self.rows[s].append(dict(
                    q=op.q_heads, kv=op.kv_heads, kvb=op.kv_cache_bytes_per_token(self.bytes), numel=numel,
                    flops=op.attn_flops(FLOP_TOKENS, FLOP_TOKENS), changed=s > 0 and op is not ops[s - 1], err=err,
                    ab=float((ref * out).sum()), aa=float((ref * ref).sum()), bb=float((out * out).sum())))
                p = self.pipeline[s - 1] if s else None
                if p is not None and p.exact and err > EXACT_TOL * max(scale, 1.0):
                    raise VerificationError(f"pass '{p.spec()}' claims to be exact but changes layer {i} "
                                            f"({op.info.name}): max abs error {err:.3g}")

    def stages(self, total_params: int, names: list) -> list:
        out, base = [], sum(r["numel"] for r in self.rows[0])
        for s, rows in enumerate(self.rows):
            p = self.pipeline[s - 1] if s else None
            ab, aa, bb = (sum(r[k] for r in rows) for k in ("ab", "aa", "bb"))
            errs = [r["err"] for r in rows]
            out.append(Stage(
                name=p.name if p else "original", spec=p.spec() if p else "", exact=p.exact if p else True,
                sites_changed=sum(r["changed"] for r in rows),
                params=total_params - base + sum(r["numel"] for r in rows),
                q_heads=[r["q"] for r in rows], kv_heads=[r["kv"] for r in rows],
                kv_cache_bytes_per_token=sum(r["kvb"] for r in rows), attn_flops=sum(r["flops"] for r in rows),
                max_abs_err=max(errs, default=0.0), cosine=ab / max((aa * bb) ** 0.5, 1e-30), seconds=self.seconds[s],
                site_names=names, site_errors=errs, diagnostics=[str(d) for d in self.diags[s]], stats=self.stats[s]))
        return out



def streaming_extras(mode: str, ckpt: Checkpoint, out_dir: str, sizes: list, finish: Writeback, seconds: float):
    cfg = finish.config or ckpt.config
    return {"mode": mode, "input": ckpt.folder, "output": out_dir, "shards": len(ckpt.files),
            "dtype": str(ckpt.dtype).replace("torch.", ""), "bytes_written": sum(sizes), "seconds": seconds,
            "config": {k: cfg.get(k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim")}}
