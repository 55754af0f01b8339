"""Mean and spread over seeds, and markdown tables: how every experiment summarises and writes its results
(experiments/pipeline.py, experiments/common.py and the scripts on it). Imports nothing of ours."""
from __future__ import annotations

import statistics


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves, as the summaries record them."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
