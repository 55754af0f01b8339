"""The frontier verdict (experiments/frontier.py): FID compared at matched recall, crossings located."""
import json

import pytest

from experiments.frontier import best_by_recall, main, matched_recall, pareto_points, points_of_pipeline


def _entries(points):
    return [{"value": i, "recall": {"mean": r, "std": 0.0}, "fid": {"mean": f, "std": 0.0}}
            for i, (r, f) in enumerate(points)]


def test_matched_recall_gap_and_crossing():
    # a: FID 10 everywhere; b: FID falls linearly from 14 at recall 0.2 to 6 at recall 0.6 -> they cross at 0.4
    summary = {"a": _entries([(0.3, 10.0), (0.5, 10.0), (0.1, 10.0), (0.7, 10.0)]),
               "b": _entries([(0.6, 6.0), (0.2, 14.0)])}  # unsorted on purpose
    v = matched_recall(summary, "a", "b", n=401)
    assert v["overlap"] == pytest.approx([0.2, 0.6])
    assert v["mean_fid_gap"] == pytest.approx(0.0, abs=1e-9)  # symmetric around the crossing
    assert len(v["crossings"]) == 1 and v["crossings"][0] == pytest.approx(0.4, abs=1e-3)
    assert v["a_lower_share"] == pytest.approx(0.5, abs=0.01)


def test_disjoint_recall_ranges_give_no_verdict():
    summary = {"a": _entries([(0.1, 1.0), (0.2, 1.0)]), "b": _entries([(0.5, 1.0), (0.6, 1.0)])}
    assert matched_recall(summary, "a", "b")["overlap"] is None


def test_best_by_recall_hands_over_where_the_frontiers_cross():
    # a: FID 10 on recall 0.1-0.7; b: 14 -> 6 on 0.2-0.6 (crosses a at 0.4); c: FID 1 only on 0.65-0.7
    summary = {"a": _entries([(0.1, 10.0), (0.7, 10.0)]), "b": _entries([(0.2, 14.0), (0.6, 6.0)]),
               "c": _entries([(0.65, 1.0), (0.7, 1.0)])}
    segments = best_by_recall(summary, n=601)
    assert [m for _, _, m in segments] == ["a", "b", "a", "c"]
    assert segments[0][0] == pytest.approx(0.1) and segments[-1][1] == pytest.approx(0.7)
    assert segments[1][0] == pytest.approx(0.4, abs=2e-3) and segments[1][1] == pytest.approx(0.6, abs=2e-3)
    assert segments[3][0] == pytest.approx(0.65, abs=2e-3)


def test_best_by_recall_leaves_a_gap_between_frontiers_out():
    # seed 2 had only CC-DPO (recall 0.1-0.2) and DDO (0.5-0.6): no method at 0.3, and a's segment ends at 0.2
    summary = {"a": _entries([(0.1, 5.0), (0.2, 6.0)]), "b": _entries([(0.5, 9.0), (0.6, 8.0)]),
               "c": _entries([(0.55, 1.0), (0.6, 1.0)])}
    segments = best_by_recall(summary, n=501)
    assert [m for _, _, m in segments] == ["a", "b", "c"]
    assert segments[0][1] == pytest.approx(0.2, abs=2e-3) and segments[1][0] == pytest.approx(0.5, abs=2e-3)
    assert segments[1][1] == pytest.approx(0.55, abs=2e-3)


def test_pareto_points_keep_what_nothing_beats_on_both_recall_and_fid():
    summary = {"a": _entries([(0.1, 5.0), (0.3, 9.0), (0.2, 12.0)]), "b": _entries([(0.25, 8.0), (0.4, 20.0)])}
    front = pareto_points(summary)
    # a@0.2 (FID 12) is beaten by b@0.25 (FID 8); a@0.3 (9) is kept: nothing has recall >= 0.3 and FID <= 9
    assert [(m, r, f) for m, _, r, f in front] == [("a", 0.1, 5.0), ("b", 0.25, 8.0), ("a", 0.3, 9.0),
                                                     ("b", 0.4, 20.0)]


def _row(fid, recall, seeds=2):
    return {"fid": {"mean": fid, "std": 1.0, "values": [fid] * seeds},
            "recall": {"mean": recall, "std": 0.0, "values": [recall] * seeds},
            "precision": {"mean": 0.5, "std": 0.0, "values": [0.5] * seeds}}


def test_a_folder_pipeline_summary_becomes_frontier_points(tmp_path):
    # the row names experiments/pipeline.py writes: base, base+cfg<w>, nll, <method>-<knob leaf><value>
    summary = {"base": _row(30.0, 0.5), "base+cfg0.5": _row(20.0, 0.4), "base+cfg2": _row(25.0, 0.2),
               "nll": _row(28.0, 0.5), "mclr-lam10": _row(24.0, 0.2), "mclr-lam0.3": _row(18.0, 0.4),
               "mclr_dial-lam3": _row(19.0, 0.3), "gft-beta0.667": _row(21.0, 0.35), "cc_dpo-beta6": _row(22.0, 0.4)}
    points = points_of_pipeline(summary)
    assert set(points) == {"cfg", "mclr", "mclr_dial", "gft", "cc_dpo"}  # base and nll have no knob
    assert [e["value"] for e in points["mclr"]] == [0.3, 10.0] and points["mclr"][0]["seeds"] == 2
    assert [e["value"] for e in points["cfg"]] == [0.5, 2.0] and points["gft"][0]["value"] == 0.667
    path = tmp_path / "summary-x" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps(summary))
    main(["--from-summary", str(path)])
    verdicts = json.loads((path.parent / "frontier.json").read_text())["matched_recall"]
    # MCLR (0.2, 24) -> (0.4, 18) against CFG (0.2, 25) -> (0.4, 20): 1 lower at 0.2, 2 at 0.4, 1.5 on average
    assert verdicts["mclr vs cfg"]["mean_fid_gap"] == pytest.approx(-1.5)
    assert "mclr vs cfg: recall 0.200-0.400" in (path.parent / "frontier.md").read_text()
    assert (path.parent / "frontier.png").is_file()


def test_from_summary_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="--from-summary .*nope.json: no such file"):
        main(["--from-summary", str(tmp_path / "nope.json")])
