"""experiments/check_demo.py: a `make demo` comparison is checked against the seed-0 row of docs/reproducibility.md."""
import json

import pytest

from eval.networks.mnist_cnn import SHIPPED
from experiments.check_demo import REFERENCE, check, main
from var_mclr.errors import UserError


def write_comparison(tmp_path, shift=None, sha=SHIPPED[16][1], seed=0):
    """A compare directory as `make demo` writes it, with the reference's values plus `shift` {(row, key): delta}."""
    shift = shift or {}
    compare = tmp_path / "compare-s0-n5000-0000abcd"
    rows = []
    for name, values in REFERENCE.items():
        rows.append({"name": name, **{k: v + shift.get((name, k), 0.0) for k, v in values.items()}})
        (compare / name).mkdir(parents=True)
        (compare / name / "metrics.json").write_text(json.dumps(
            {"seed": seed, "num_samples": 5000, "feature_network": {"weights_sha256": sha}}))
    (compare / "results.json").write_text(json.dumps(rows))
    return compare


def test_within_tolerance_passes(tmp_path):
    compare = write_comparison(tmp_path, {("mclr", "fid"): 4.9, ("cca", "recall"): -0.019})
    assert check(compare) == []
    main(["--root", str(tmp_path)])  # no SystemExit


def test_a_row_outside_tolerance_fails_naming_it(tmp_path):
    compare = write_comparison(tmp_path, {("mclr", "fid"): 5.1, ("base", "precision"): 0.03})
    problems = check(compare)
    assert len(problems) == 2 and problems[0].startswith("base: precision") and problems[1].startswith("mclr: fid")
    with pytest.raises(SystemExit) as e:
        main(["--compare", str(compare)])
    assert e.value.code == 1


def test_other_feature_network_or_seed_fails(tmp_path):
    assert len(check(write_comparison(tmp_path / "a", sha="0" * 64))) == len(REFERENCE)
    assert all("seed 1" in p for p in check(write_comparison(tmp_path / "b", seed=1)))


def test_no_demo_run_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--root", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(UserError, match="make demo"):
        main(["--root", str(tmp_path), "--debug"])
