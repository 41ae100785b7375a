"""Per-head analysis of a model's attention: which heads matter, how they attend, which are redundant.

For every site (layer) and head, on the calibration batches:

- importance: Taylor head importance (``rewrite.importance``, ℓ2-normalized per layer);
- entropy: mean entropy of the attention rows, H = −Σ_k p_k log p_k (nats);
- sink mass: mean attention probability on the first key position;
- long-range mass: mean attention mass beyond a recent window of W tokens and 4 sinks (``rewrite.long_range``,
  score=distance of ``local-heads``; W = a quarter of the calibration length unless given);
- K / V similarity: linear CKA between every pair of KV heads of a layer,
  CKA(i, j) = ‖C_ij‖²_F / (‖C_ii‖_F ‖C_jj‖_F), C the centred cross-covariance of the heads' outputs
  over all tokens (invariant to rotations of a head's basis, so 1 means "mergeable up to a rotation").

    result = rewrite.analyze(model, example_inputs, calibration)
    result.print(); result.to_html("analysis.html"); result.heatmaps()
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch

from .calibrate import record_site_inputs
from .graph import sites
from .importance import attention_probs, calibration_batches, head_importance, row_entropy

__all__ = ["Analysis", "analyze", "attach_heatmaps"]


@dataclasses.dataclass
class Analysis:
    """Per site (layer) lists, one value per head; similarities are [heads × heads] per layer."""

    model: str
    sites: list
    q_heads: list
    kv_heads: list
    importance: list
    entropy: list
    sink: list
    k_similarity: list
    v_similarity: list
    refusals: list = dataclasses.field(default_factory=list)
    long_range: list = dataclasses.field(default_factory=list)
    long_range_window: int = 0

    # ---- data ---------------------------------------------------------------------------------
    def heatmaps(self) -> dict:
        """title -> 2-D list (layers × heads); ragged layers are padded with NaN."""
        return {
            "head importance (taylor, ℓ2-normalized per layer)": _pad(self.importance),
            "attention entropy (nats)": _pad(self.entropy),
            "attention-sink mass (probability on key 0)": _pad(self.sink),
            "K redundancy: max CKA to another KV head of the layer": _pad([_max_off(m) for m in self.k_similarity]),
            "V redundancy: max CKA to another KV head of the layer": _pad([_max_off(m) for m in self.v_similarity]),
            **({f"long-range mass (attention beyond a window of {self.long_range_window} + 4 sinks)":
                _pad(self.long_range)} if self.long_range else {}),
        }

    def summary(self) -> list:
        """One dict per layer: the numbers ``print`` shows."""
        rows = []
        for i, name in enumerate(self.sites):
            imp = self.importance[i]
            rows.append({
                "site": name, "q_heads": self.q_heads[i], "kv_heads": self.kv_heads[i],
                "least_important_head": int(min(range(len(imp)), key=imp.__getitem__)),
                "importance_min": min(imp), "importance_max": max(imp),
                "entropy_mean": sum(self.entropy[i]) / len(self.entropy[i]),
                "sink_mean": sum(self.sink[i]) / len(self.sink[i]),
                "most_similar_k": _best_pair(self.k_similarity[i]), "most_similar_v": _best_pair(self.v_similarity[i]),
            })
        return rows

    def to_json(self) -> dict:
        return json.loads(json.dumps({**dataclasses.asdict(self), "summary": self.summary()}))

    # ---- output -------------------------------------------------------------------------------
    def rich_table(self):
        from rich.table import Table

        t = Table(title=f"attention analysis: {self.model}")
        for c in ("site", "q/kv", "importance", "least", "entropy", "sink", "top K pair", "top V pair"):
            t.add_column(c, justify="left" if c == "site" else "right")
        for r in self.summary():
            t.add_row(r["site"], f"{r['q_heads']}/{r['kv_heads']}",
                      f"{r['importance_min']:.3f}–{r['importance_max']:.3f}", str(r["least_important_head"]),
                      f"{r['entropy_mean']:.3f}", f"{r['sink_mean']:.3f}",
                      _pair_text(r["most_similar_k"]), _pair_text(r["most_similar_v"]))
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console()
        console.print(self.rich_table())
        for r in self.refusals:
            console.print(f"[red]not canonicalized[/] {r}")

    def report(self):
        """A ``rewrite.report.Report`` holding the heatmaps and the per-layer summary."""
        from .report import Report

        rep = Report(pipeline="analyze", model=self.model, refusals=list(self.refusals))
        return attach_heatmaps(rep, self)

    def to_html(self, path: Optional[str] = None) -> str:
        return self.report().to_html(path)


def attach_heatmaps(report, analysis: Analysis):
    """Add the analysis heatmaps and per-layer summary to a convert report (returns the report)."""
    report.heatmaps.update(analysis.heatmaps())
    report.extras["attention analysis"] = analysis.summary()
    return report


# ---- computing it ------------------------------------------------------------------------------
def analyze(model, example_inputs, calibration=None, progress: bool = True, window: Optional[int] = None) -> Analysis:
    """Capture ``model`` and measure every head on ``calibration`` (default: the example inputs).

    Args:
        model: the PyTorch model (never mutated).
        example_inputs: a tuple of args or a dict of kwargs, as for ``rewrite.convert``.
        calibration: optional iterable of batches like ``example_inputs``.
        window: the recent window of the long-range mass (default: a quarter of the longest calibration batch).
    """
    from .api import _progress, canonicalize
    from .capture import capture, normalize_inputs
    from .pass_base import PassContext

    cap = capture(model, example_inputs)
    gm, refusals = canonicalize(cap)
    batches = [normalize_inputs(model, b) for b in calibration] if calibration is not None else [cap.kwargs]
    batches = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]
    ctx = PassContext(calibration=batches, captured=cap, progress=_progress() if progress else None)
    importance = head_importance(gm, ctx, "taylor")
    ops = sites(gm)
    stats = [_SiteStats(op) for op in ops]
    call = ctx.call(gm)
    for kw in ctx.track(calibration_batches(ctx), "attention statistics"):
        for st, recs in zip(stats, record_site_inputs(gm, call, [kw])):
            st.add(recs[0].args)
    long_range, window = _long_range(gm, ctx, ops, window)
    return Analysis(
        model=type(model).__name__, sites=[op.info.name for op in ops], q_heads=[op.q_heads for op in ops],
        kv_heads=[op.kv_heads for op in ops], importance=[s.tolist() for s in importance],
        entropy=[s.entropy() for s in stats], sink=[s.sink() for s in stats],
        k_similarity=[s.k.cka() for s in stats], v_similarity=[s.v.cka() for s in stats],
        refusals=[str(r) for r in refusals], long_range=long_range, long_range_window=window)


def _long_range(gm, ctx, ops, window: Optional[int]) -> tuple:
    """(per causal model, each head's attention mass beyond ``window``; the window), or ([], 0)."""
    from .errors import PassError
    from .long_range import distance_scores

    if not all(op.causal or op.info.causal_mask for op in ops):
        return [], 0
    longest = max((t.shape[-1] for b in calibration_batches(ctx) for t in b.values() if t.dim() == 2), default=0)
    window = window or max(1, longest // 4)
    try:
        return [s.tolist() for s in distance_scores(gm, ctx, window, 4)], window
    except PassError:  # calibration no longer than the window
        return [], 0


class _Moments:
    """Running Σy, Σ y_i y_jᵀ over tokens for all heads of one projection (fp64)."""

    def __init__(self):
        self.total, self.cross, self.n = None, None, 0

    def add(self, y: torch.Tensor) -> None:
        t = y.detach().double().permute(0, 2, 1, 3).flatten(0, 1)  # (B, H, S, d) -> (N, H, d)
        h, d = t.shape[1:]
        if self.total is None:
            self.total = torch.zeros(h, d, dtype=torch.float64)
            self.cross = torch.zeros(h, h, d, d, dtype=torch.float64)
        self.total += t.sum(0)
        flat = t.flatten(1)  # (N, H*d)
        self.cross += (flat.T @ flat).unflatten(0, (h, d)).unflatten(-1, (h, d)).permute(0, 2, 1, 3)
        self.n += t.shape[0]

    def cka(self) -> list:
        mean = self.total / max(self.n, 1)
        cov = self.cross / max(self.n, 1) - torch.einsum("id,je->ijde", mean, mean)  # (H, H, d, d)
        fro2 = cov.pow(2).sum(dim=(2, 3))  # ‖C_ij‖²_F
        diag = fro2.diagonal().sqrt()
        return (fro2 / torch.outer(diag, diag).clamp_min(1e-30)).tolist()


class _SiteStats:
    def __init__(self, op):
        self.op = op
        self.ent = torch.zeros(op.q_heads, dtype=torch.float64)
        self.sink_sum = torch.zeros(op.q_heads, dtype=torch.float64)
        self.rows = 0
        self.k, self.v = _Moments(), _Moments()

    def add(self, args: tuple) -> None:
        p = attention_probs(self.op, args)  # (B, Hq, Sq, Sk)
        ent, _ = row_entropy(p)
        self.ent += ent.double().sum(dim=(0, 2))
        self.sink_sum += p[..., 0].double().sum(dim=(0, 2))
        self.rows += p.shape[0] * p.shape[2]
        x, kv, _mask, *side = args
        with torch.no_grad():
            _, k, v = self.op.project_qkv(x, kv, *side)
        self.k.add(k)
        self.v.add(v)

    def entropy(self) -> list:
        return (self.ent / max(self.rows, 1)).tolist()

    def sink(self) -> list:
        return (self.sink_sum / max(self.rows, 1)).tolist()


# ---- small helpers -----------------------------------------------------------------------------
def _pad(rows: list) -> list:
    width = max((len(r) for r in rows), default=0)
    return [list(r) + [float("nan")] * (width - len(r)) for r in rows]


def _max_off(matrix: list) -> list:
    n = len(matrix)
    return [max((matrix[i][j] for j in range(n) if j != i), default=float("nan")) for i in range(n)]


def _best_pair(matrix: list):
    n = len(matrix)
    pairs = [(matrix[i][j], i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return None
    value, i, j = max(pairs)
    return [i, j, value]


def _pair_text(pair) -> str:
    return "-" if pair is None else f"{pair[0]},{pair[1]}: {pair[2]:.3f}"
