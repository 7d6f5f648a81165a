"""Turning summaries into text: terminal tables, Markdown, and one self-contained HTML page.

A document is a list of blocks (`Heading`, `Para`, `Table`, `Figure`, `Code`, `Bullets`, `Explorer`),
built once by report.py and rendered by `markdown()` and `html()`, so report.md and report.html always
say the same thing. `Table.of(summary)` formats a tables.py summary the same way everywhere, with the
number policy of sensray.analyze.fmt.
"""

from __future__ import annotations

import base64
import html as _html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import polars as pl

from sensray.analyze import fmt
from sensray.analyze.fmt import cell, percent, ratio  # noqa: F401  (re-exported: compare.py, notebooks)

STATS = ("n", "distinct", "failed", "median", "q25", "q75", "worst", "ppl", "top1", "kl", "catastrophic",
         "nonfinite", "share", "ci_low", "ci_high", "median_low", "median_high", "ppl_low", "ppl_high")
TRIAL_FORMATS = {"delta_ppl": fmt.ratio, "× baseline": fmt.ratio, "ppl": fmt.ppl, "kl": fmt.kl, "KL": fmt.kl,
                 "top1_agreement": fmt.agreement, "top-1 agree": fmt.agreement}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    note: str = ""  # under the table: what the rows are, how they are sorted
    title: str = ""  # above the table, when a section has several

    @classmethod
    def of(cls, summary: pl.DataFrame, limit: int | None = None, note: str = "", title: str = "") -> "Table":
        """A tables.py summary as display strings; a table of single trials (no `median`) shows each
        trial's metrics through TRIAL_FORMATS."""
        if "median" not in summary.columns:
            return cls.plain(summary if limit is None else summary.head(limit), TRIAL_FORMATS, note, title)
        keys = [c for c in summary.columns if c not in STATS]
        if "kind" in keys and summary["kind"].n_unique() == 1 and len(keys) > 1:
            keys.remove("kind")  # one kind per run: the column would repeat it on every line
        shown = _shown(summary)
        headers = [*keys, *[h for name, h in _COLUMNS if name in shown]]
        rows = [[cell(r[k]) for k in keys] + [f(r) for name, f in _CELLS if name in shown]
                for r in (summary if limit is None else summary.head(limit)).iter_rows(named=True)]
        return cls(headers, rows, [False] * len(keys) + [True] * (len(headers) - len(keys)), note, title)

    @classmethod
    def plain(cls, frame: pl.DataFrame, formats: dict[str, Any] | None = None, note: str = "",
              title: str = "", labels: int | None = None) -> "Table":
        """Any DataFrame, each column through `formats[column]` (default: `cell`); numbers align right, and
        with `labels`, every column after the first `labels` does too (numbers already written as text)."""
        formats = formats or {}
        rows = [[formats.get(c, cell)(r[c]) for c in frame.columns] for r in frame.iter_rows(named=True)]
        numeric = [frame[c].dtype.is_numeric() or (labels is not None and i >= labels)
                   for i, c in enumerate(frame.columns)]
        return cls(list(frame.columns), rows, numeric, note, title)


def _has(summary: pl.DataFrame, column: str) -> bool:
    return column in summary.columns and summary[column].null_count() < len(summary)


def _shown(summary: pl.DataFrame) -> set[str]:
    """The optional columns this summary fills: intervals, metrics, distinct positions, failures."""
    shown = {"n", "median", "worst", "catastrophic"}
    shown |= {c for c in ("ppl", "top1", "kl") if _has(summary, c)}
    if summary["n"].max() and summary["n"].max() > 1:
        shown.add("q25")
    if _has(summary, "distinct") and (summary["distinct"] != summary["n"]).any():
        shown.add("distinct")
    if _has(summary, "failed") and summary["failed"].sum() > 0:
        shown.add("failed")
    return shown


def _interval(r: dict) -> tuple:
    return r.get("median_low"), r.get("median_high")


_COLUMNS = (
    ("n", "n"), ("distinct", "distinct"), ("median", "× baseline (95% CI)"), ("q25", "q25–q75"),
    ("worst", "worst"), ("ppl", "ppl"), ("top1", "top-1 agree"), ("kl", "KL"), ("catastrophic", "catastrophic"),
    ("failed", "failed"),
)


def _median_cell(r: dict) -> str:
    low, high = _interval(r)
    shown = low is not None and r["median"] is not None and r["median"] != float("inf")
    return fmt.ratio(r["median"], low, high) + (f" ({fmt.span(low, high)})" if shown else "")


def _catastrophic_cell(r: dict) -> str:
    if not r["n"]:
        return str(r["catastrophic"])
    share = percent(r["share"])
    interval = f", {fmt.span(r['ci_low'], r['ci_high'], percent)}" if r.get("ci_low") is not None else ""
    return f"{r['catastrophic']} ({share}{interval})"


_CELLS = (
    ("n", lambda r: str(r["n"])),
    ("distinct", lambda r: str(r["distinct"])),
    ("median", _median_cell),
    ("q25", lambda r: fmt.span(r["q25"], r["q75"]) if r["n"] > 1 else "–"),  # one trial has no spread
    ("worst", lambda r: fmt.sig(r["worst"])),
    ("ppl", lambda r: fmt.ppl(r["ppl"])),
    ("top1", lambda r: fmt.agreement(r["top1"])),
    ("kl", lambda r: fmt.kl(r["kl"])),
    ("catastrophic", _catastrophic_cell),
    ("failed", lambda r: str(r["failed"])),
)


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
    anchor: str | None = None  # an id to link to (the contents list at the top of report.html)


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
    """A figure: its caption, the file stem it is saved under, the matplotlib figure until saved, then
    the path (report.write saves it); unsaved figures are left out of the rendered page."""

    caption: str
    stem: str = ""
    fig: Any = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.caption, str) or not isinstance(self.stem, str):  # Figure(path, caption) of old
            raise TypeError(f"Figure(caption, stem, fig, path=...) takes the caption first, got {self.caption!r}")
        if self.path is not None:
            self.path = Path(self.path)


@dataclass
class Explorer:
    """Every trial, sortable and filterable in the browser (sensray.analyze.explorer); Markdown points to it."""

    payload: dict[str, Any]
    rows: int


Block = Union[Heading, Para, Bullets, Code, Table, Figure, Explorer]


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
            out += ([f"**{b.title}**", ""] if b.title else []) + _markdown_table(b) + [""]
            out += [f"*{b.note}*", ""] if b.note else []
        elif isinstance(b, Figure) and b.path is not None:
            out += [f"![{b.caption}]({b.path.relative_to(base).as_posix()})", "", f"*{b.caption}*", ""]
        elif isinstance(b, Explorer):
            out += [f"All {b.rows:,} trials, sortable and filterable: `report.html` (section *All trials*), "
                    "or `trials.parquet` in the run directory.", ""]
    return "\n".join(out)


def _markdown_table(t: Table) -> list[str]:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    align = ["---:" if num else "---" for num in t.numeric]
    return ["| " + " | ".join(map(esc, t.headers)) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(map(esc, r)) + " |" for r in t.rows
    ]


_CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:62em;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;overflow-wrap:anywhere}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0 .3em}
table{border-collapse:collapse;font-size:13px}th,td{padding:.2em .6em;border-bottom:1px solid #ddd}
th{text-align:left;background:#f4f4f4;vertical-align:bottom}td{white-space:nowrap}
th.n,td.n{text-align:right}td.n{font-variant-numeric:tabular-nums}p.note{color:#555;font-size:13px;margin:.2em 0 1.2em}
p.title{font-weight:600;margin:1em 0 .2em}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{color:#555;font-size:13px}
code,pre{background:#f4f4f4;border-radius:3px}code{overflow-wrap:anywhere}
pre{padding:.6em;white-space:pre-wrap;overflow-wrap:anywhere}.nw{white-space:nowrap}
nav.toc{font-size:14px}nav.toc a{margin-right:1em;white-space:nowrap}"""


def html(doc: Document) -> str:
    """One self-contained page: figures embedded as base64, no external file or network access."""
    from sensray.analyze.explorer import EXPLORER_CSS, explorer_html

    body = [_toc(doc)]
    for b in doc.blocks:
        if isinstance(b, Heading):
            anchor = f' id="{_html.escape(b.anchor)}"' if b.anchor else ""
            body.append(f"<h{b.level}{anchor}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Code):
            body.append(f"<pre><code>{_code_html(b.text)}</code></pre>")
        elif isinstance(b, Table):
            body.append(_html_table(b))
        elif isinstance(b, Figure) and b.path is not None:
            body.append(_html_figure(b))
        elif isinstance(b, Explorer):
            body.append(explorer_html(b.payload))
    title = _html.escape(doc.title)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            f"<style>{_CSS}\n{EXPLORER_CSS}</style></head>\n<body>\n<h1>{title}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _toc(doc: Document) -> str:
    links = [f'<a href="#{_html.escape(b.anchor)}">{_inline(b.text)}</a>'
             for b in doc.blocks if isinstance(b, Heading) and b.anchor and b.level == 2]
    return f'<nav class="toc">{" ".join(links)}</nav>' if links else ""


_RANGE = re.compile(r"[^\s()\[\],;]+–[^\s()\[\],;]+")  # 16.0%–36.8%, ×1.00–×1.01: kept on one line


def _inline(text: str) -> str:
    """Escape, then the two Markdown spans the report uses (`code`, **bold**), and ranges unbroken."""
    text = _html.escape(text)
    text = _RANGE.sub(lambda m: f'<span class="nw">{m.group(0)}</span>', text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _code_html(text: str) -> str:
    """Commands that wrap between words, never inside an option: a break after `-` would show `- -threshold`."""
    return re.sub(r"(?<!\S)(--?[A-Za-z][\w-]*)", r'<span class="nw">\1</span>', _html.escape(text))


def _html_table(t: Table) -> str:
    head = "".join(f"<th{' class=n' if num else ''}>{_html.escape(h)}</th>" for h, num in zip(t.headers, t.numeric))

    def row(values: list[str]) -> str:
        return "".join(f"<td{' class=n' if num else ''}>{_html.escape(v)}</td>" for v, num in zip(values, t.numeric))

    rows = "".join(f"<tr>{row(r)}</tr>" for r in t.rows)
    note = f'<p class="note">{_inline(t.note)}</p>' if t.note else ""
    title = f'<p class="title">{_inline(t.title)}</p>' if t.title else ""
    return f'{title}<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>{note}'


def _html_figure(f: Figure) -> str:
    mime = "image/svg+xml" if f.path.suffix == ".svg" else "image/png"
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    caption = _html.escape(f.caption)
    return f'<figure><img alt="{caption}" src="data:{mime};base64,{data}"><figcaption>{_inline(f.caption)}' \
           f'</figcaption></figure>'
