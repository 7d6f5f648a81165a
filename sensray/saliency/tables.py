"""The saliency map as tables (polars): per tensor, block, module kind, output row; top elements and flips.

    frames = tables(scores, fisher=True)
    frames["tensors"].sort("taylor", descending=True).head()

Columns (sums over the elements of the group, in nats of mean NLL):
    taylor        sum |g * w|                 first-order damage of zeroing, element by element
    zero_first    -sum g * w                  first-order change of zeroing the whole group
    zero_second   1/2 sum F * w^2             its second-order term (empirical Fisher diagonal)
    zero_predicted  zero_first + zero_second
    fisher        sum F                       curvature: 1/2 fisher * s^2 is the expected damage of noise of std s
    grad_norm     sqrt(sum g^2)
    flip_<field>  the largest predicted loss increase g * (flipped - w) of one flip of that field
    flip_statistics  quantized weights: the largest predicted increase of one flip in any of their statistics
                  (scales, ...); the flips table lists those flips under the statistic's own name
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sensray.saliency.scores import Scores, TensorScores

PLACE = {"tensor": pl.String, "layer": pl.Int64, "module": pl.String}
SUMMED = ("taylor", "zero_first", "zero_second", "zero_predicted", "fisher", "numel")


def tables(scores: Scores, fisher: bool) -> dict[str, pl.DataFrame]:
    """tensors, blocks, modules, rows, elements, flips."""
    entries = scores.entries()
    tensors = pl.DataFrame([_tensor(e, fisher, scores.seen_fields) for e in entries],
                           schema_overrides=PLACE | {"fisher": pl.Float64, "zero_second": pl.Float64})
    return {
        "tensors": tensors,
        "blocks": _grouped(tensors.filter(pl.col("layer").is_not_null()), "layer"),
        "modules": _grouped(tensors, "module"),
        "rows": pl.concat([_rows(e, fisher) for e in entries]),
        "elements": pl.DataFrame([r for e in entries for r in _elements(e)], schema_overrides=PLACE),
        "flips": pl.DataFrame([r for e in entries for r in _flips(e)], schema_overrides=PLACE),
    }


def _place(entry: TensorScores) -> dict:
    return {"tensor": entry.named.name, "layer": entry.named.layer, "module": entry.named.module}


def _total(entry: TensorScores, name: str, fisher: bool = True) -> float | None:
    return float(np.sum(entry.sums[name])) if fisher and name in entry.sums else None


def _tensor(entry: TensorScores, fisher: bool, fields: tuple[str, ...]) -> dict:
    zero_first = _total(entry, "zero_first")
    fisher_w2 = _total(entry, "fisher_w2", fisher)
    zero_second = fisher_w2 / 2 if fisher_w2 is not None else None
    best = {f"flip_{name}": _best(entry.flips.get(name)) for name in fields}
    if entry.statistics:
        best["flip_statistics"] = max((_best(top) for tops in entry.statistics.values() for top in tops.values()),
                                      key=lambda x: -np.inf if x is None else x, default=None)
    return {**_place(entry), "param": entry.param, "dtype": str(entry.dtype).removeprefix("torch."),
            "numel": int(np.prod(entry.shape)), "taylor": _total(entry, "taylor"), "zero_first": zero_first,
            "zero_second": zero_second, "zero_predicted": zero_first + (zero_second or 0.0),
            "fisher": _total(entry, "fisher", fisher), "grad_norm": float(np.sqrt(_total(entry, "grad_sq"))), **best}


def _best(top) -> float | None:
    return float(top.score[0]) if top is not None and len(top.score) else None


def _grouped(tensors: pl.DataFrame, key: str) -> pl.DataFrame:
    present = [c for c in SUMMED if c in tensors.columns]
    return (tensors.group_by(key, maintain_order=True)
            .agg(pl.len().alias("tensors"), *(pl.col(c).sum() for c in present),
                 *(pl.col(c).max() for c in tensors.columns if c.startswith("flip_")))
            .sort(key))


def _rows(entry: TensorScores, fisher: bool) -> pl.DataFrame:
    sums = {name: entry.sums[name] for name in ("taylor", "zero_first") if name in entry.sums}
    if fisher and "fisher" in entry.sums:
        sums |= {"fisher": entry.sums["fisher"], "zero_second": entry.sums["fisher_w2"] / 2}
    frame = pl.DataFrame({"row": np.arange(entry.rows), **sums})
    return frame.select(*(pl.lit(v, dtype=PLACE[k]).alias(k) for k, v in _place(entry).items()), pl.all())


def _coords(entry: TensorScores, index: int) -> list[int]:
    return [int(c) for c in np.unravel_index(index, entry.shape)] if entry.shape else []


def _elements(entry: TensorScores) -> list[dict]:
    top = entry.top
    return [{**_place(entry), "rank": rank, "index": int(i), "coords": _coords(entry, int(i)), "weight": float(w),
             "grad": float(g), "taylor": float(t)}
            for rank, (i, w, g, t) in enumerate(zip(top["index"], top["weight"], top["grad"], top["taylor"]))]


def _flips(entry: TensorScores) -> list[dict]:
    own = [{**_place(entry), "field": name, "rank": rank, **row, "coords": _coords(entry, row["index"])}
           for name, top in entry.flips.items() for rank, row in enumerate(top.rows())]
    return own + [{**_place(entry), "tensor": statistic, "field": name, "rank": rank, **row, "coords": [row["index"]]}
                  for statistic, tops in entry.statistics.items() for name, top in tops.items()
                  for rank, row in enumerate(top.rows())]  # statistics are 1-D
