"""The pass-by-pass report: Markdown, JSON, a rich terminal table and a self-contained HTML page."""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from typing import Optional

__all__ = ["Stage", "Report"]


@dataclasses.dataclass
class Stage:
    name: str
    spec: str
    exact: bool
    sites_changed: int
    params: int
    q_heads: list
    kv_heads: list
    kv_cache_bytes_per_token: int
    attn_flops: int
    max_abs_err: float
    cosine: float
    seconds: float
    site_names: list = dataclasses.field(default_factory=list)
    site_errors: list = dataclasses.field(default_factory=list)
    diagnostics: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)
    first_divergence: Optional[str] = None
    state_bytes: int = 0  # fixed-size decoding state per sequence (linear attention), beside the per-token KV bytes
    perplexity: Optional[float] = None  # on the text given to rewrite.evaluate
    bits_per_byte: Optional[float] = None


@dataclasses.dataclass
class Report:
    pipeline: str
    model: str = ""
    backend: str = "eager"
    stages: list = dataclasses.field(default_factory=list)
    refusals: list = dataclasses.field(default_factory=list)  # sites found but not canonicalized
    extras: dict = dataclasses.field(default_factory=dict)  # backend checks, analysis, loss curves
    heatmaps: dict = dataclasses.field(default_factory=dict)  # title -> 2-D list (layers x heads)

    # ---- data ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        data = dict(data)
        data["stages"] = [Stage(**s) for s in data.get("stages", [])]
        return cls(**data)

    # ---- text ---------------------------------------------------------------------------------
    COLUMNS = ("stage", "exact", "changed", "params", "q heads", "kv heads", "KV B/tok", "attn GFLOP",
               "max abs err", "cosine", "s")

    def columns(self) -> tuple:
        """COLUMNS, plus perplexity and bits per byte once ``rewrite.evaluate`` has measured them."""
        evaluated = any(s.perplexity is not None for s in self.stages)
        return self.COLUMNS + (("ppl", "bits/byte") if evaluated else ())

    def _rows(self):
        evaluated = len(self.columns()) > len(self.COLUMNS)
        for s in self.stages:
            row = (s.name, "yes" if s.exact else "no", str(s.sites_changed), f"{s.params:,}",
                   _heads(s.q_heads), _heads(s.kv_heads), f"{s.kv_cache_bytes_per_token:,}",
                   f"{s.attn_flops / 1e9:.4g}", f"{s.max_abs_err:.3g}", f"{s.cosine:.6f}", f"{s.seconds:.2f}")
            if evaluated:
                row += ("-" if s.perplexity is None else f"{s.perplexity:.4g}",
                        "-" if s.bits_per_byte is None else f"{s.bits_per_byte:.4f}")
            yield row

    def to_markdown(self) -> str:
        lines = ["# rewrite report", "", f"pipeline: `{self.pipeline or '(none)'}`", "",
                 f"model: {self.model}  backend: {self.backend}", "",
                 "| " + " | ".join(self.columns()) + " |", "|" + "---|" * len(self.columns())]
        lines += ["| " + " | ".join(r) + " |" for r in self._rows()]
        notes = [(s.name, d) for s in self.stages for d in s.diagnostics]
        if notes or self.refusals:
            lines += ["", "## Diagnostics", ""]
            lines += [f"- {name}: {d}" for name, d in notes]
            lines += [f"- not canonicalized: {r}" for r in self.refusals]
        for s in self.stages:
            if s.first_divergence:
                lines.append(f"- {s.name}: first diverging site {s.first_divergence}")
        for key, value in self.extras.items():
            lines += ["", f"## {key}", "", "```", json.dumps(value, indent=1, default=str)[:4000], "```"]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        from rich.table import Table

        t = Table(title=f"rewrite: {self.pipeline or '(capture only)'}")
        for c in self.columns():
            t.add_column(c, justify="right" if c not in ("stage", "q heads", "kv heads") else "left",
                         min_width=len(max((s.name for s in self.stages), key=len, default="")) if c == "stage" else None)
        for r in self._rows():
            t.add_row(*r)
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console()
        console.print(self.rich_table())
        for s in self.stages:
            for d in s.diagnostics:
                console.print(f"[yellow]{s.name}[/]: {d}")
        for r in self.refusals:
            console.print(f"[red]not canonicalized[/] {r}")

    # ---- html ---------------------------------------------------------------------------------
    def to_html(self, path: Optional[str] = None) -> str:
        figs = [_plot_heads(self), _plot_site_errors(self), _plot_evaluation(self)]
        figs += [_plot_heatmap(title, data) for title, data in {**self.heatmaps, **_span_heatmaps(self)}.items()]
        figs += [_plot_curve(k, v) for k, v in self.extras.items() if k.startswith("loss")]
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._rows())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns())
        diag = "".join(f"<li>{html.escape(s.name)}: {html.escape(str(d))}</li>"
                       for s in self.stages for d in s.diagnostics)
        diag += "".join(f"<li>not canonicalized: {html.escape(str(r))}</li>" for r in self.refusals)
        imgs = "".join(f'<figure><img src="data:image/png;base64,{b}"/></figure>' for b in figs if b)
        extras = "".join(f"<h3>{html.escape(k)}</h3><pre>{html.escape(json.dumps(v, indent=1, default=str)[:6000])}</pre>"
                         for k, v in self.extras.items())
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rewrite report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}
code{{background:#f4f4f4;padding:2px 4px}}img{{max-width:100%}}</style></head><body>
<h1>rewrite report</h1><p>pipeline: <code>{html.escape(self.pipeline or '(none)')}</code></p>
<p>model: {html.escape(self.model)} &middot; backend: {html.escape(self.backend)}</p>
<table><tr>{head}</tr>{rows}</table><ul>{diag}</ul>{imgs}{extras}</body></html>"""
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page


def _heads(values: list) -> str:
    if not values:
        return "-"
    if len(set(values)) == 1:
        return f"{values[0]}×{len(values)}"
    return ",".join(map(str, values))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(width=8, height=3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _plot_heads(report: Report) -> str:
    if not report.stages or not report.stages[0].q_heads:
        return ""
    fig, ax = _figure()
    n = len(report.stages)
    width = 0.8 / max(1, n)
    for j, s in enumerate(report.stages):
        xs = [i + j * width for i in range(len(s.q_heads))]
        ax.bar(xs, s.q_heads, width=width * 0.9, label=f"{s.name} q")
        ax.scatter(xs, s.kv_heads, marker="_", s=120, color="k")
    ax.set_xlabel("site (layer)")
    ax.set_ylabel("heads (bars: query, dashes: kv)")
    ax.set_title("Heads per layer per stage")
    ax.legend(fontsize=7)
    return _png(fig)


def _plot_site_errors(report: Report) -> str:
    stages = [s for s in report.stages if any(s.site_errors)]  # the captured stage is exact: nothing to draw
    if not stages:
        return ""
    fig, ax = _figure()
    for s in stages:
        ax.plot(range(len(s.site_errors)), [max(e, 1e-12) for e in s.site_errors], marker="o", label=s.name)
    ax.set_yscale("log")
    ax.set_xlabel("site (layer)")
    ax.set_ylabel("max abs error of the site's output")
    ax.set_title("Error per site (on the original's inputs)")
    ax.legend(fontsize=7)
    return _png(fig)


def _plot_heatmap(title: str, data: list) -> str:
    if not data:
        return ""
    fig, ax = _figure(6, 0.35 * len(data) + 1.5)
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _png(fig)


def _span_heatmaps(report: Report) -> dict:
    """title -> layers × heads for each local-heads stage: its long-range score and the chosen split."""
    out = {}
    for st in report.stages:
        per_site = [v for v in (st.stats or {}).values() if isinstance(v, dict) and "streaming" in v]
        if not per_site:
            continue
        width = max(v["q_heads"] for v in per_site)
        split = [[1.0 if h in v["streaming"] else 0.0 for h in range(v["q_heads"])] + [float("nan")] *
                 (width - v["q_heads"]) for v in per_site]
        first = per_site[0]
        if all("long_range_score" in v for v in per_site):
            out[f"{st.name}: long-range score ({first['score']}, window {first['window']})"] = [
                list(v["long_range_score"]) + [float("nan")] * (width - v["q_heads"]) for v in per_site]
        out[f"{st.name}: streaming heads (1: window {first['window']} + {first['sinks']} sinks, 0: full)"] = split
    return out


def _plot_curve(title: str, values) -> str:
    """A loss curve: a list (one value per step) or a dict {step: value} (held-out evaluations)."""
    if isinstance(values, dict) and values:
        steps, values = [int(k) for k in values], list(values.values())
    elif isinstance(values, list) and values:
        steps = list(range(1, len(values) + 1))
    else:
        return ""
    fig, ax = _figure()
    ax.plot(steps, values, marker="o" if len(values) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    return _png(fig)


def _plot_evaluation(report: Report) -> str:
    """Bits per byte (or perplexity) per stage, and each stage's relative error per site, from rewrite.evaluate."""
    ev = report.extras.get("evaluation")
    if not isinstance(ev, dict) or not ev.get("stages"):
        return ""
    stages = ev["stages"]
    use_bpb = all(s.get("bits_per_byte") is not None for s in stages)
    values = [s["bits_per_byte"] if use_bpb else s["perplexity"] for s in stages]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax.bar(range(len(values)), values, color=["#888"] + ["#3a7"] * (len(values) - 1))
    ax.set_xticks(range(len(values)), [s["name"] for s in stages], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bits per byte" if use_bpb else "perplexity")
    ax.set_title(f"Language-model fidelity ({ev.get('tokens', 0):,} tokens)")
    for s in stages:
        if s.get("site_errors") and any(s["site_errors"]):
            bx.plot(range(len(s["site_errors"])), [max(e, 1e-9) for e in s["site_errors"]], marker="o",
                    label=s["name"])
    bx.set_yscale("log")
    bx.set_xlabel("site (layer)")
    bx.set_ylabel("relative error of the site's output")
    bx.set_title("Per-site error on the evaluation text")
    if bx.lines:
        bx.legend(fontsize=7)
    return _png(fig)
