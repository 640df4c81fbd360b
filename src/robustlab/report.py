"""Reports: a JSON file for programs and a self-contained HTML page (plots embedded as PNG) for people.

A :class:`Report` is a list of sections; each capability (white-box attacks, black-box attacks, evaluation,
training, certification) adds its own. Plots are drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["Report", "Section", "image_grid_figure", "line_plot"]

_STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d2330; line-height: 1.45; padding: 0 1rem; }
h1 { border-bottom: 2px solid #2c5cc5; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; color: #2c5cc5; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
th, td { border: 1px solid #d5d9e2; padding: .3rem .6rem; text-align: right; }
th { background: #eef2fa; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; } figcaption { font-size: .88rem; color: #555; }
img { max-width: 100%; } .note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5rem .8rem; }
code { background: #f3f4f7; padding: 0 .25rem; border-radius: 3px; }
"""


def _png_base64(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return html.escape(str(value))


@dataclass
class Section:
    """One part of the report: paragraphs, tables and figures in order."""

    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, paragraph: str, *, note: bool = False) -> Section:
        css = ' class="note"' if note else ""
        self.parts.append(f"<p{css}>{html.escape(paragraph)}</p>")
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> Section:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{_format_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figure(self, figure: Any, caption: str = "") -> Section:
        data = _png_base64(figure)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{cap}</figure>'
        )
        return self

    def render(self) -> str:
        return f"<section><h2>{html.escape(self.title)}</h2>{''.join(self.parts)}</section>"


@dataclass
class Report:
    """A report under construction; :meth:`write` produces ``report.json`` and ``report.html``."""

    title: str
    data: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        payload = {"title": self.title, "created": created, **self.data}
        json_path = out / "report.json"
        json_path.write_text(json.dumps(_jsonable(payload), indent=2))
        body = "".join(s.render() for s in self.sections)
        page = (
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
            f"<p>Generated {created} by robustlab.</p>{body}</body></html>"
        )
        html_path = out / "report.html"
        html_path.write_text(page)
        return json_path, html_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    percent: bool = True,
    logx: bool = False,
) -> Any:
    """A figure with one line per named ``(xs, ys)`` series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name, (xs, ys) in series.items():
        values = [100 * v for v in ys] if percent else list(ys)
        axis.plot(list(xs), values, marker="o", markersize=3.5, label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel + (" (%)" if percent else ""))
    if logx:
        axis.set_xscale("log")
    if percent:
        axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title)
    axis.legend(fontsize=8)
    return figure


def image_grid_figure(rows: Sequence[tuple[str, Tensor]], captions: Sequence[Sequence[str]] | None = None) -> Any:
    """A grid: one row per ``(label, images)`` pair, images ``(n, C, H, W)`` in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(int(images.shape[0]) for _, images in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.25 * columns, 1.45 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c >= images.shape[0]:
                axis.axis("off")
                continue
            image = images[c].detach().float().cpu().clamp(0, 1)
            if image.shape[0] == 1:
                axis.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(image.permute(1, 2, 0).numpy())
            if captions is not None:
                axis.set_title(captions[r][c], fontsize=7)
            if c == 0:
                axis.set_ylabel(label, fontsize=8)
    figure.tight_layout()
    return figure
