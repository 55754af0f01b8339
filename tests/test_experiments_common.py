"""experiments/common.py and eval/tables.py, what the experiment scripts share: cached rows, summaries and tables."""
from __future__ import annotations

import json

from eval.tables import markdown_table, mean_std, spread, summarise
from experiments.common import cached_row
from experiments.frontier import report, summarise_points
from experiments.pipeline import write_summary


def test_a_cached_row_is_computed_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"fid": 1.5, "recall": None}

    path = tmp_path / "point" / "row.json"
    assert cached_row(path, compute) == {"fid": 1.5, "recall": None}
    assert cached_row(path, compute) == json.loads(path.read_text()) and len(calls) == 1


def test_tables_and_spread():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n"
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": 2 ** 0.5, "values": [1.0, 3.0]}
    assert spread([2.0])["std"] == 0.0


def test_one_summarise_over_seeds_and_its_cells():
    rows = [{"fid": 2.0, "recall": None}, {"fid": 4.0}, {"fid": 6.0, "recall": 0.5}]
    summary = summarise(rows, ("fid", "recall", "precision"))
    assert summary == {"fid": spread([2.0, 4.0, 6.0]), "recall": spread([0.5])}  # a missing value is left out
    assert mean_std(summary["fid"]) == "4 ± 2" and mean_std(None) == "n/a"
    assert mean_std(summary["recall"]) == "0.5 ± 0" and mean_std(summary["recall"], std_of_one=False) == "0.5"


def test_the_pipeline_summary_gives_one_seed_its_mean_alone(tmp_path):
    per_seed = [[{"name": "base", "fid": 10.0 + s}, {"name": "mclr", "fid": 3.0, "recall": None}] for s in (0, 2)]
    table = write_summary(per_seed, tmp_path)
    assert "| base | 11 ± 1.4 | n/a |" in table and "| mclr | 3 ± 0 | n/a |" in table
    assert json.loads((tmp_path / "summary.json").read_text())["mclr"] == {"fid": spread([3.0, 3.0])}
    assert "| base | 10 | n/a |" in write_summary(per_seed[:1], tmp_path)


def test_frontier_report_reads_mean_and_spread_over_seeds():
    rows = {"cfg": {1.0: [{"fid": 10.0, "recall": 0.2, "precision": 0.8}, {"fid": 12.0, "recall": 0.4,
                                                                            "precision": 0.6}]},
            "mclr": {3.0: [{"fid": 8.0, "recall": 0.35, "precision": 0.7, "class_accuracy": None}]}}
    summary = summarise_points(rows)
    assert summary["cfg"][0]["fid"]["mean"] == 11.0 and "class_accuracy" not in summary["mclr"][0]
    table, verdicts = report(summary)
    assert table.splitlines()[:4] == [
        "| method | knob | value | seeds | fid | precision | recall | class_accuracy |",
        "|---|---|---|---|---|---|---|---|",
        "| cfg | cfg_scale | 1 | 2 | 11 ± 1.4 | 0.7 ± 0.14 | 0.3 ± 0.14 | n/a |",
        "| mclr | loss.mclr.lam | 3 | 1 | 8 ± 0 | 0.7 ± 0 | 0.35 ± 0 | n/a |"]
    assert verdicts["mclr vs cfg"]["overlap"] is None  # one point each: no recall range to compare over
    assert verdicts["best_by_recall"] == []
    # mclr (recall 0.35, FID 8) has the higher recall and the lower FID than cfg's mean (0.3, 11): cfg is beaten
    assert [(m, v) for m, v, _, _ in verdicts["pareto"]] == [("mclr", 3.0)]
