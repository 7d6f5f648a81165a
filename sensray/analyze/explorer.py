"""Every trial in the report: a sortable, filterable, paginated table inside the self-contained report.html.

    from sensray.analyze.explorer import payload, explorer_html
    page_part = explorer_html(payload(trials, seq))

The trials travel as JSON, column by column, in a `<script type="application/json">` element; a
small inline script (no library, no network) draws one page of rows at a time, so a run of 100,000
trials opens as fast as one of 100. Click a column header to sort (again: the other way); type in
the filter box: words match any column, `column>value`, `<`, `>=`, `<=`, `=`, `!=` compare one
column (numbers as numbers), `column~text` looks for text in it; terms combine with AND.
Values are written with the same policy as the report's tables (sensray.analyze.fmt).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import polars as pl

from sensray.analyze import tables
from sensray.changes import tensor

if TYPE_CHECKING:
    from sensray.analyze.stats import Sequences


def payload(trials: pl.DataFrame, seq: "Sequences | None" = None) -> dict[str, Any]:
    """The table's columns: name, header, how to write it (str, int, ratio, ppl, pct, kl, num, bool), values."""
    t = tables.annotate(trials)
    columns: list[tuple[str, str, str, list]] = [("trial_id", "trial", "str", t["trial_id"].to_list()),
                                                 ("target", "target", "str", t["target"].to_list())]
    for name in tables.conditions(t) + (["seed"] if "seed" in t.columns and t["seed"].n_unique() > 1 else []):
        kind = "str" if t[name].dtype == pl.String else "num"
        columns.append((name, name, kind, t[name].to_list()))
    columns += _provenance(t)
    columns += _metrics(t, seq)
    return {"columns": [{"name": n, "label": label, "format": f} for n, label, f, _ in columns],
            "values": [_json_values(values) for *_, values in columns]}


def _provenance(t: pl.DataFrame) -> list[tuple[str, str, str, list]]:
    """What each trial changed: the weight, element, bit and values for element-wise kinds; the achieved
    sparsity for pruning; otherwise the tensors touched, in words."""
    out = []
    if "tensor" in t.columns and t["tensor"].drop_nulls().len():
        out.append(("matrix", "matrix", "str", [tables.matrix_of(x) for x in t["tensor"].to_list()]))
    if "changes" in t.columns and t["changes"].drop_nulls().len():
        first = [c[0] if c and len(c) == 1 else None for c in t["changes"].to_list()]
        out += [("tensor", "tensor", "str", t["tensor"].to_list()),
                ("element", "element", "str", [None if c is None else str(c["coords"]) for c in first]),
                ("flipped_bit", "bit", "int", t["flipped_bit"].to_list()),
                ("old", "old", "num", [None if c is None else c["old"] for c in first]),
                ("new", "new", "num", [None if c is None else c["new"] for c in first])]
        if (t["elements_changed"].fill_null(0) > 1).any():
            out.append(("elements_changed", "elements", "int", t["elements_changed"].to_list()))
        return out
    achieved = tables.achieved_sparsity(t)
    if achieved is not None:
        out.append(("achieved", "achieved sparsity", "pct", achieved.to_list()))
    if "tensors" in t.columns:
        touched = t["tensors"].to_list()
        out.append(("tensors", "tensors", "int", [None if x is None else len(x) for x in touched]))
        if max((len(x) for x in touched if x), default=0) == 1:  # one tensor each: say what happened to it
            out.append(("changed", "what changed", "str", [None if not x else tensor(x[0]) for x in touched]))
        else:
            out.append(("rel_norm", "|dW|/|W|", "num", [_rel_norm(x) for x in touched]))
    return out


def _rel_norm(touched: list[dict] | None) -> float | None:
    """The size of the change over every touched tensor together: sqrt(sum |dW|^2 / sum |W|^2) needs the
    norms themselves, which rows do not keep, so the numel-weighted mean of the per-tensor ratios."""
    pairs = [(x["rel_norm"], x["numel"]) for x in touched or [] if x.get("rel_norm") is not None and x["numel"]]
    return sum(r * n for r, n in pairs) / sum(n for _, n in pairs) if pairs else None


def _metrics(t: pl.DataFrame, seq: "Sequences | None") -> list[tuple[str, str, str, list]]:
    out = [("ppl", "ppl", "ppl", t["ppl"].to_list()), ("delta_ppl", "× baseline", "ratio", t["delta_ppl"].to_list())]
    if seq is not None:
        bounds = seq.trials(t)
        out += [("ratio_low", "CI low", "ratio", bounds["ratio_low"].to_list()),
                ("ratio_high", "CI high", "ratio", bounds["ratio_high"].to_list())]
    for name, label, kind in (("top1_agreement", "top-1 agree", "pct"), ("kl", "KL", "kl")):
        if name in t.columns:
            out.append((name, label, kind, t[name].to_list()))
    out.append(("nonfinite", "non-finite", "bool", t["nonfinite"].to_list()))
    if t["error"].drop_nulls().len():
        out.append(("error", "error", "str", t["error"].to_list()))
    return out


def _json_values(values: list) -> list:
    """Strict JSON: non-finite floats become "inf" / "-inf" (NaN: null), looked for only where they are."""
    floats = [i for i, v in enumerate(values) if type(v) is float and not math.isfinite(v)]
    for i in floats:
        v = values[i]
        values[i] = None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return values


def explorer_html(data: dict[str, Any]) -> str:
    """The section's HTML: the filter box, the pager, the table, the data and the script."""
    rows = len(data["values"][0]) if data["values"] else 0
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (f'<div class="explorer" id="explorer" data-rows="{rows}">'
            f'<div class="controls"><label>filter <input type="search" id="trial-filter" size="28" '
            f'placeholder="e.g. mlp.down ppl&gt;100 bit=30"></label> '
            f'<button type="button" id="trial-prev">&larr; previous</button> '
            f'<button type="button" id="trial-next">next &rarr;</button> '
            f'<label>rows per page <select id="trial-size"><option>25</option><option selected>50</option>'
            f'<option>200</option><option>1000</option></select></label> <span id="trial-status"></span></div>'
            f'<div class="scroll"><table id="trial-table"><thead></thead><tbody></tbody></table></div></div>\n'
            f'<script type="application/json" id="trial-data">{text}</script>\n'
            f'<script>{SCRIPT}</script>')


EXPLORER_CSS = """.explorer .controls{display:flex;flex-wrap:wrap;gap:.4em 1em;align-items:center;font-size:14px;margin:.5em 0}
.explorer input{max-width:100%}#trial-table th{cursor:pointer;user-select:none}
#trial-table th[aria-sort=ascending]::after{content:" ▲"}#trial-table th[aria-sort=descending]::after{content:" ▼"}
#trial-table td{white-space:nowrap}"""

# Formats mirror sensray.analyze.fmt: ratio 3 significant figures, ppl 2 decimals, % 2 decimals, KL 2 s.f.
SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById("trial-data").textContent);
  const cols = data.columns, n = data.values.length ? data.values[0].length : 0;
  const num = v => v === "inf" ? Infinity : v === "-inf" ? -Infinity : v;
  const vals = data.values.map(col => col.map(num));
  // Thousands separators by hand: Intl's toLocaleString is ~100x slower, and a filter writes every cell.
  const group = s => { const [whole, part] = s.split("."); return whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (part === undefined ? "" : "." + part); };
  const sig = (x, d) => { const s = x.toPrecision(d); return s.includes("e+") && Math.abs(x) < 1e15 ? group(String(Math.round(+s))) : s; };
  const write = {
    str: v => String(v), int: v => String(v), bool: v => v ? "yes" : "no",
    ratio: v => sig(v, 3), ppl: v => Math.abs(v) < 1e6 ? group(v.toFixed(2)) : sig(v, 3),
    pct: v => (100 * v).toFixed(2) + "%", kl: v => v === 0 ? "0" : v.toPrecision(2), num: v => String(+v.toPrecision(4)),
  };
  const show = (v, f) => v === null || v === undefined ? "–" : !isFinite(v) && typeof v === "number" ? (v > 0 ? "inf" : "-inf") : write[f](v);
  const texts = [];  // each column written out once, when a filter first needs it
  const text = j => texts[j] || (texts[j] = vals[j].map(v => show(v, cols[j].format).toLowerCase()));
  const table = document.getElementById("trial-table"), status = document.getElementById("trial-status");
  let order = [...Array(n).keys()], shown = order, page = 0, sortCol = -1, sortDir = 1;
  const size = () => +document.getElementById("trial-size").value;
  table.tHead.innerHTML = "<tr>" + cols.map((c, j) => `<th data-col="${j}" title="sort by ${c.label}">${c.label}</th>`).join("") + "</tr>";
  function compare(a, b) {
    const x = vals[sortCol][a], y = vals[sortCol][b];
    if (x === y) return a - b;
    if (x === null) return 1; if (y === null) return -1;   // blanks last either way
    return (typeof x === "number" && typeof y === "number" ? (x < y ? -1 : 1) : String(x).localeCompare(String(y), "en", {numeric: true})) * sortDir;
  }
  function term(t) {
    const m = t.match(/^([\w.]+)(>=|<=|!=|=|>|<|~)(.*)$/);
    const j = m ? cols.findIndex(c => c.name.toLowerCase() === m[1] || c.label.toLowerCase() === m[1]) : -1;
    if (j < 0) { cols.forEach((c, k) => text(k)); return i => texts.some(col => col[i].includes(t)); }
    const op = m[2], want = m[3], w = Number(want), numeric = want !== "" && !isNaN(w);
    const written = text(j);
    return i => {
      const v = vals[j][i], s = written[i];
      if (op === "~") return s.includes(want);
      if (v === null) return op === "!=";
      const a = numeric && typeof v === "number" ? v : s, b = numeric && typeof v === "number" ? w : want;
      return op === "=" ? a === b || s === want : op === "!=" ? a !== b && s !== want : op === ">" ? a > b : op === "<" ? a < b : op === ">=" ? a >= b : a <= b;
    };
  }
  function filter() {
    const terms = document.getElementById("trial-filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean).map(term);
    shown = terms.length ? order.filter(i => terms.every(f => f(i))) : order;
    page = 0; draw();
  }
  function draw() {
    const pages = Math.max(1, Math.ceil(shown.length / size()));
    page = Math.min(page, pages - 1);
    const rows = shown.slice(page * size(), (page + 1) * size());
    table.tBodies[0].innerHTML = rows.map(i => "<tr>" + cols.map((c, j) =>
      `<td${["str", "bool"].includes(c.format) ? "" : ' class="n"'}>${escape(show(vals[j][i], c.format))}</td>`).join("") + "</tr>").join("");
    status.textContent = shown.length ? `rows ${page * size() + 1}–${page * size() + rows.length} of ${shown.length}` +
      (shown.length < n ? ` matching (of ${n})` : "") : `no trial matches (of ${n})`;
    document.getElementById("trial-prev").disabled = page === 0;
    document.getElementById("trial-next").disabled = page >= pages - 1;
  }
  const escape = s => s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
  table.tHead.addEventListener("click", e => {
    const th = e.target.closest("th"); if (!th) return;
    const j = +th.dataset.col; sortDir = j === sortCol ? -sortDir : 1; sortCol = j;
    order = [...Array(n).keys()].sort(compare);
    for (const h of table.tHead.rows[0].cells) h.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
    filter();
  });
  document.getElementById("trial-filter").addEventListener("input", filter);
  document.getElementById("trial-size").addEventListener("change", () => { page = 0; draw(); });
  document.getElementById("trial-prev").addEventListener("click", () => { page--; draw(); });
  document.getElementById("trial-next").addEventListener("click", () => { page++; draw(); });
  draw();
})();
"""
