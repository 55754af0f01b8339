"""experiments/combine_seeds.py: seeds compared apart give the summary a joint run writes, and bad inputs are refused
by name before anything is written."""
import json
import statistics
from pathlib import Path

import pytest

from experiments import frontier
from experiments.combine_seeds import combine, main

FIDS = {0: {"base": 120.0, "base+cfg0.5": 70.0, "mclr-lam10": 90.0, "mclr-lam3": 95.0},
        1: {"base": 130.0, "base+cfg0.5": 76.0, "mclr-lam10": 99.0, "mclr-lam3": 93.0}}


def seed_results(tmp_path, seed, names=None, base=None, shared=None):
    rows = [{**(shared or {}), "name": name,
             "ckpt": (base or f"runs/pretrain-s{seed}/ckpt.safetensors") if name.startswith("base")
             else f"runs/{name}-s{seed}/ckpt.safetensors", "fid": fid, "recall": 0.3 + 0.01 * i + 0.1 * seed,
             "precision": 0.9, "class_accuracy": 0.99}
            for i, (name, fid) in enumerate(FIDS[seed].items()) if names is None or name in names]
    path = tmp_path / f"compare-s{seed}" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def test_combined_summary_is_mean_and_sample_std_per_row(tmp_path):
    paths = [seed_results(tmp_path, 0), seed_results(tmp_path, 1)]
    combine(paths, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary) == list(FIDS[0])
    fid = summary["mclr-lam10"]["fid"]
    assert fid["values"] == [90.0, 99.0]
    assert fid["mean"] == pytest.approx(94.5)
    assert fid["std"] == pytest.approx(statistics.stdev([90.0, 99.0]))  # sample std, as the pipeline's summary
    assert summary["base"]["recall"]["mean"] == pytest.approx(0.35)
    # best.md: the lowest mean FID of MCLR is lam 3 (94.0 against 94.5), inside the two-value grid's edges
    best = (tmp_path / "out" / "best.md").read_text()
    assert "| mclr | mclr-lam3 | 94 |" in best
    assert json.loads((tmp_path / "out" / "sources.json").read_text()) == [str(p) for p in paths]


def test_frontier_reads_the_combined_summary(tmp_path):
    combine([seed_results(tmp_path, 0), seed_results(tmp_path, 1)], tmp_path / "out")
    points = frontier.points_of_pipeline(json.loads((tmp_path / "out" / "summary.json").read_text()))
    assert [e["value"] for e in points["mclr"]] == [3.0, 10.0]
    assert all(e["seeds"] == 2 for e in points["mclr"] + points["cfg"])


def test_rows_that_differ_are_refused_naming_the_file(tmp_path, capsys):
    first, other = seed_results(tmp_path, 0), seed_results(tmp_path, 1, names=("base", "mclr-lam10"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(first), str(other), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: {other}: its rows are not those of {first}") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_one_seed_counted_twice_is_refused(tmp_path):
    path = seed_results(tmp_path, 0)
    with pytest.raises(ValueError, match="one seed counted twice"):
        combine([path, path], tmp_path / "out")
    twin = seed_results(tmp_path, 1, base="runs/pretrain-s0/ckpt.safetensors")  # another file, the same base
    with pytest.raises(ValueError, match="one seed counted twice"):
        combine([path, twin], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_summary_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{\"kept\": true}")
    with pytest.raises(ValueError, match="already holds a summary.json"):
        combine([seed_results(tmp_path, 0), seed_results(tmp_path, 1)], out)
    assert json.loads((out / "summary.json").read_text()) == {"kept": True}


def test_unreadable_or_single_inputs_are_refused(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text("[{\"name\": \"base\"")  # truncated
    with pytest.raises(ValueError, match=f"{bad}: not a readable results.json"):
        combine([bad, seed_results(tmp_path, 1)], tmp_path / "out")
    with pytest.raises(ValueError, match="two or more"):
        combine([seed_results(tmp_path, 0)], tmp_path / "out")


@pytest.mark.parametrize("key", ["tokenizer_weights_sha256", "feature_network_sha256"])
def test_seeds_on_another_tokenizer_or_evaluator_are_refused(tmp_path, key):
    # the same stage trained on another CPU type: another tokenizer, another evaluator, another FID scale
    shared = {"tokenizer_weights_sha256": "aa", "feature_network_sha256": "bb", "feature_network": "cnn, acc 0.973"}
    first = seed_results(tmp_path, 0, shared=shared)
    other = seed_results(tmp_path, 1, shared={**shared, key: "other"})
    with pytest.raises(ValueError, match=f"{other}: its .*\\({key}\\) is not that of {first}.*cannot be pooled"):
        combine([first, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_older_file_without_digests_is_compared_on_what_both_record(tmp_path):
    described = {"feature_network": "cnn, acc 0.973"}
    old = seed_results(tmp_path, 0, shared=described)
    new = seed_results(tmp_path, 1, shared={**described, "tokenizer_weights_sha256": "aa"})
    combine([old, new], tmp_path / "out")
    assert (tmp_path / "out" / "summary.json").is_file()


def test_without_both_digests_the_evaluator_is_compared_on_its_description(tmp_path):
    old = seed_results(tmp_path, 0, shared={"feature_network": "cnn, cached classifier-digits-16px-d99e.safetensors"})
    new = seed_results(tmp_path, 1, shared={"feature_network": "cnn, cached classifier-digits-16px-3d55.safetensors",
                                            "feature_network_sha256": "bb"})
    with pytest.raises(ValueError, match=f"{new}: its feature network \\(feature_network\\) is not that of {old}"):
        combine([old, new], tmp_path / "out")


def test_one_evaluator_digest_pools_seeds_whose_descriptions_name_other_cache_files(tmp_path):
    # the folder rebuilt between two seeds: new file times, a new cache file name, the same classifier weights
    first = seed_results(tmp_path, 0, shared={"feature_network": "cnn, cached classifier-digits-16px-d99e.safetensors",
                                              "feature_network_sha256": "bb", "tokenizer_weights_sha256": "aa"})
    second = seed_results(tmp_path, 1, shared={"feature_network": "cnn, cached classifier-digits-16px-3d55.safetensors",
                                               "feature_network_sha256": "bb", "tokenizer_weights_sha256": "aa"})
    combine([first, second], tmp_path / "out")
    assert (tmp_path / "out" / "summary.json").is_file()


def test_the_committed_digits_seeds_pool_as_docs_say(tmp_path):
    # docs/unseen_folders.md pools the three Xeon seeds and refuses the EPYC one (another tokenizer and evaluator)
    data = Path(__file__).resolve().parents[1] / "docs" / "data"
    xeon = [data / f"digits-s{seed}-xeon-results.json" for seed in (0, 1, 2)]
    combine(xeon, tmp_path / "xeon")
    summary = json.loads((tmp_path / "xeon" / "summary.json").read_text())
    assert len(summary["gft-beta0.667"]["fid"]["values"]) == 3
    with pytest.raises(ValueError, match="cannot be pooled"):
        combine([xeon[0], data / "digits-s1-epyc-results.json"], tmp_path / "mixed")
