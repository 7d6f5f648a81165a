"""Turning summaries into text: terminal tables, Markdown, and one self-contained HTML page.

A document is a list of blocks (`Heading`, `Para`, `Table`, `Figure`, `Code`, `Bullets`), built
once by report.py and rendered by `markdown()` and `html()`, so report.md and report.html always
say the same thing. `Table.of(summary)` formats a tables.py summary the same way everywhere.
"""

from __future__ import annotations

import base64
import html as _html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import polars as pl

STATS = ("n", "failed", "median", "q25", "q75", "worst", "catastrophic", "nonfinite", "share", "ci_low", "ci_high")


def ratio(x: float | None) -> str:
    """A delta_ppl (ppl / baseline) with the precision its size needs: 1.000038, 0.9884, 412.7, inf."""
    if x is None:
        return "–"
    if math.isnan(x) or math.isinf(x):
        return "inf" if x > 0 else str(x)
    if abs(x - 1) < 1e-3:
        return f"{x:.6f}"
    return f"{x:.4f}" if x < 10 else f"{x:.1f}" if x < 1e4 else f"{x:.0f}" if x < 1e7 else f"{x:.3g}"


def percent(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.0f}%" if x in (0.0, 1.0) else f"{100 * x:.1f}%"


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _kl(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


TRIAL_FORMATS = {"delta_ppl": ratio, "kl": _kl, "top1_agreement": percent}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]

    @classmethod
    def of(cls, summary: pl.DataFrame, limit: int | None = None) -> "Table":
        """A tables.py summary as display strings: keys, n, median, spread, worst, catastrophic, CI.
        A table of single trials (no statistics, e.g. tables.worst_trials) shows each trial's metrics."""
        if "median" not in summary.columns:
            return cls.plain(summary if limit is None else summary.head(limit), TRIAL_FORMATS)
        keys = [c for c in summary.columns if c not in STATS]
        if "kind" in keys and summary["kind"].n_unique() == 1 and len(keys) > 1:
            keys.remove("kind")  # one kind per run: the column would repeat it on every line
        has_ci = "ci_low" in summary.columns and summary["ci_low"].null_count() < len(summary)
        has_failed = "failed" in summary.columns and summary["failed"].sum() > 0
        headers = [*keys, "n", "median", "q25–q75", "worst", "catastrophic"]
        headers += ["95% CI"] * has_ci + ["failed"] * has_failed
        rows = [
            [cell(r[k]) for k in keys] + _stat_cells(r, has_ci, has_failed)
            for r in (summary if limit is None else summary.head(limit)).iter_rows(named=True)
        ]
        return cls(headers, rows, [False] * len(keys) + [True] * (len(headers) - len(keys)))

    @classmethod
    def plain(cls, frame: pl.DataFrame, formats: dict[str, Any] | None = None) -> "Table":
        """Any DataFrame, each column through `formats[column]` (default: `cell`)."""
        formats = formats or {}
        rows = [[formats.get(c, cell)(r[c]) for c in frame.columns] for r in frame.iter_rows(named=True)]
        numeric = [frame[c].dtype.is_numeric() for c in frame.columns]
        return cls(list(frame.columns), rows, numeric)


def _stat_cells(r: dict, has_ci: bool, has_failed: bool) -> list[str]:
    share = f" ({percent(r['share'])})" if r["n"] else ""
    spread = f"{ratio(r['q25'])}–{ratio(r['q75'])}" if r["n"] > 1 else "–"  # one trial has no spread
    out = [str(r["n"]), ratio(r["median"]), spread, ratio(r["worst"]),
           f"{r['catastrophic']}{share}"]
    if has_ci:
        out.append("–" if r["ci_low"] is None else f"{percent(r['ci_low'])}–{percent(r['ci_high'])}")
    if has_failed:
        out.append(str(r["failed"]))
    return out


def text_table(table: Table, indent: str = "  ") -> str:
    """Aligned columns for a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in table.rows)) if table.rows else len(h)
              for i, h in enumerate(table.headers)]

    def line(values: list[str]) -> str:
        return indent + "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, table.numeric)
        ).rstrip()

    return "\n".join([line(table.headers), indent + "  ".join("-" * w for w in widths)]
                     + [line(r) for r in table.rows])


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    text: str


@dataclass
class Figure:
    path: Path
    caption: str


Block = Union[Heading, Para, Bullets, Code, Table, Figure]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def markdown(doc: Document, base: Path) -> str:
    """Markdown with figures linked relative to `base` (the directory report.md is written to)."""
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Code):
            out += ["```", b.text.rstrip("\n"), "```", ""]
        elif isinstance(b, Table):
            out += _markdown_table(b) + [""]
        elif isinstance(b, Figure):
            out += [f"![{b.caption}]({b.path.relative_to(base).as_posix()})", "", f"*{b.caption}*", ""]
    return "\n".join(out)


def _markdown_table(t: Table) -> list[str]:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    align = ["---:" if num else "---" for num in t.numeric]
    return ["| " + " | ".join(map(esc, t.headers)) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(map(esc, r)) + " |" for r in t.rows
    ]


_CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px}th,td{padding:.2em .6em;border-bottom:1px solid #ddd}
th{text-align:left;background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:13px}
code,pre{background:#f4f4f4;border-radius:3px}pre{padding:.6em;overflow-x:auto}"""


def html(doc: Document) -> str:
    """One self-contained page: figures embedded as base64, no external file or network access."""
    body = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Code):
            body.append(f"<pre><code>{_html.escape(b.text)}</code></pre>")
        elif isinstance(b, Table):
            body.append(_html_table(b))
        elif isinstance(b, Figure):
            body.append(_html_figure(b))
    title = _html.escape(doc.title)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{title}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then the two Markdown spans the report uses: `code` and **bold**."""
    text = _html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_html.escape(h)}</th>" for h in t.headers)
    def row(values: list[str]) -> str:
        return "".join(f"<td{' class=n' if num else ''}>{_html.escape(v)}</td>" for v, num in zip(values, t.numeric))

    rows = "".join(f"<tr>{row(r)}</tr>" for r in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_figure(f: Figure) -> str:
    mime = "image/svg+xml" if f.path.suffix == ".svg" else "image/png"
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    caption = _html.escape(f.caption)
    return f'<figure><img alt="{caption}" src="data:{mime};base64,{data}"><figcaption>{caption}</figcaption></figure>'
