"""Mean and spread over seeds, and markdown tables: how every comparison and experiment summarises and writes its
results (eval/compare.py, experiments/pipeline.py and the experiment scripts). Imports nothing of ours."""
from __future__ import annotations

import statistics


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves, as the summaries record them."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """key -> spread of one point's rows (one per seed) over the rows that have it; a key no row has is left out."""
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            out[k] = spread(values)
    return out


def fmt(v) -> str:
    """A metric's cell: 4 significant digits, n/a when it was not measured."""
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def mean_std(s: dict | None, std_of_one: bool = True) -> str:
    """A summarised value's cell: mean ± std, n/a when no row had it; std_of_one=False writes one seed's mean alone."""
    if s is None:
        return "n/a"
    return f"{s['mean']:.4g} ± {s['std']:.2g}" if std_of_one or len(s["values"]) > 1 else f"{s['mean']:.4g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
