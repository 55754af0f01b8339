"""eval/compare.py samples a strength-conditioned fine-tuned row at a strength (--strength NAME=VALUE), records it,
refuses bad items before any output, and leaves rows without one as they were; eval/separation.py --strength."""
import csv
import json

import numpy as np
import pytest

from eval.compare import compare, main, plan_rows
from eval.separation import main as separation_main
from eval.settings import EvalSettings, SettingsError
from test_eval_strength import saved as saved_with_classes


def saved(tmp_path, objective, conditioned=True):
    """tests/test_eval_strength.py's, with MNIST's 10 classes: scored by the shipped MNIST features (no classifier to
    train) and separated on the embedded digits."""
    return saved_with_classes(tmp_path, objective, conditioned, num_classes=10)


def common(eval_cache):
    return EvalSettings(num_samples=10, batch_size=5, cache_dir=str(eval_cache))


def test_a_row_at_a_strength_samples_differently_and_records_it(tmp_path, eval_cache):
    base, gft = saved(tmp_path, "nll", conditioned=False), saved(tmp_path, "gft")
    out = tmp_path / "cmp"
    results = compare(base, [("plain", gft), ("b05", gft)], [], common(eval_cache), out, "mnist",
                      strengths={"b05": 0.5})
    by_name = {r["name"]: r for r in results}
    assert by_name["b05"]["strength"] == 0.5 and "strength" not in by_name["plain"] and "strength" not in results[0]
    samples = {n: np.load(out / n / "samples.npz")["arr_0"] for n in ("plain", "b05")}
    assert not np.array_equal(samples["plain"], samples["b05"])  # the strength reached the sampler
    assert by_name["plain"]["fid"] != by_name["b05"]["fid"]
    metrics = {n: json.loads((out / n / "metrics.json").read_text())["settings"] for n in ("plain", "b05")}
    assert metrics["b05"]["strength"] == 0.5 and metrics["b05"]["strength_of"] == "gft"
    assert metrics["b05"]["sampling"]["strength"] == 0.5 and "strength" not in metrics["plain"]
    # Separation once per checkpoint, at the neutral input: the same numbers on both rows.
    for key in ("implicit_classifier_accuracy", "mean_log_ratio_per_token", "heldout_nll_per_token"):
        assert by_name["plain"][key] == by_name["b05"][key]
    table = (out / "table.md").read_text()
    assert "| b05 | none, strength 0.5 |" in table and "| plain | none |" in table and "| base | none |" in table
    with open(out / "table.csv", newline="") as f:
        assert [row[1] for row in csv.reader(f)][1:] == ["none", "none", "none, strength 0.5"]


@pytest.mark.parametrize("items, says", [
    (["nope=0.5"], "--strength nope=0.5: 'nope' is not a --finetuned row"),
    (["b05=abc"], "--strength b05=abc: VALUE must be a finite number"),
    (["b05=nan"], "--strength b05=nan: VALUE must be a finite number"),
    (["b05=-inf"], "--strength b05=-inf: VALUE must be a finite number"),
    (["b05=0.5", "b05=0.6"], "--strength b05=0.6: row 'b05' is given a strength more than once"),
    (["0.5"], "--strength 0.5: expected NAME=VALUE"),
])
def test_bad_strength_items_are_one_line_before_any_output(tmp_path, capsys, items, says):
    out = tmp_path / "cmp"
    argv = ["--base", str(tmp_path / "b.safetensors"), "--finetuned", f"b05={tmp_path / 'g.safetensors'}",
            "--out-dir", str(out), *[x for item in items for x in ("--strength", item)]]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not out.exists()


def test_a_strength_the_model_cannot_take_is_refused_before_any_row_is_sampled(tmp_path, eval_cache):
    base, nll = saved(tmp_path, "base", conditioned=False), saved(tmp_path, "nll", conditioned=False)
    with pytest.raises(SettingsError, match="--strength 0.5: .*model.strength_cond"):
        compare(base, [("n", nll)], [], common(eval_cache), tmp_path / "cmp", "mnist", strengths={"n": 0.5})
    assert not (tmp_path / "cmp" / "base").exists()
    with pytest.raises(SettingsError, match=r"--strength 1.5: .*beta in \(0, 1\]"):
        compare(base, [("g", saved(tmp_path, "gft"))], [], common(eval_cache), tmp_path / "cmp", "mnist",
                strengths={"g": 1.5})


def test_rows_without_a_strength_are_as_before():
    expected = [{"name": "base", "ckpt": "b", "guidance": "none", "cfg_scale": 0.0},
                {"name": "base+cfg2", "ckpt": "b", "guidance": "cfg", "cfg_scale": 2.0},
                {"name": "mclr", "ckpt": "m", "guidance": "none", "cfg_scale": 0.0},
                {"name": "gft", "ckpt": "g", "guidance": "none", "cfg_scale": 0.0}]
    ft = [("mclr", "m"), ("gft", "g")]
    assert plan_rows("b", ft, [2.0]) == expected and plan_rows("b", ft, [2.0], {}) == expected
    with_one = plan_rows("b", ft, [2.0], {"gft": 0.8})
    assert with_one[:3] == expected[:3] and with_one[3] == {**expected[3], "strength": 0.8}


def test_separation_takes_the_strength_and_records_it(tmp_path, capsys):
    gft = saved(tmp_path, "gft")
    argv = ["--ckpt", gft, "--data", "mnist", "--max-images", "8", "--batch-size", "4"]

    def run(*extra):
        separation_main([*argv, *extra])
        return json.loads(capsys.readouterr().out)

    plain, at = run(), run("--strength", "0.5")
    assert "strength" not in plain and (at["strength"], at["strength_of"], at["strength_input"]) == (0.5, "gft", 0.5)
    assert at["heldout"]["heldout_nll_per_token"] != plain["heldout"]["heldout_nll_per_token"]
    neutral = run("--strength", "1")  # GFT's beta 1 is the neutral input: the numbers of no strength
    for key in ("implicit_classifier_accuracy", "mean_log_ratio_per_token", "heldout_nll_per_token"):
        assert neutral["heldout"][key] == pytest.approx(plain["heldout"][key], rel=1e-5, abs=1e-6)
    nll = saved(tmp_path, "nll", conditioned=False)
    with pytest.raises(SystemExit):
        separation_main(["--ckpt", nll, "--data", "mnist", "--strength", "0.5"])
    assert "--strength 0.5" in capsys.readouterr().err
