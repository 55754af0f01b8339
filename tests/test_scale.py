"""Training at scale: activation checkpointing (same gradients), the global batch split over processes."""
import pytest
import torch

from var_mclr.config import load_config
from var_mclr.model import VAR, VARConfig
from var_mclr.plan import resolve_batch
from var_mclr.config import ConfigError


def _grads(checkpointing: bool, drop_path: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    var = VAR(VARConfig(vocab_size=64, Cvae=8, num_classes=5, depth=3, embed_dim=64, num_heads=2,
                        patch_nums=(1, 2, 3, 4)), logprob_impl="chunked")
    var.init_weights()
    var.set_drop_path_rate(drop_path)
    var.activation_checkpointing = checkpointing
    var.train()
    g = torch.Generator().manual_seed(1)
    label, x = torch.randint(0, 5, (4,), generator=g), torch.randn(4, var.L - 1, 8, generator=g)
    idx = torch.randint(0, 64, (4, var.L), generator=g)
    torch.manual_seed(2)  # drop-path's draws
    var(label, x, target_BL=idx).sum().backward()
    return {n: p.grad for n, p in var.named_parameters()}


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_checkpointing_gives_the_same_gradients(drop_path):
    plain, ckpt = _grads(False, drop_path), _grads(True, drop_path)
    assert plain.keys() == ckpt.keys()
    for n in plain:  # the same ops on the same inputs, recomputed with the same RNG state: bit for bit
        assert torch.equal(plain[n], ckpt[n]), n


def test_checkpointing_is_off_without_gradients():
    var = VAR(VARConfig(vocab_size=16, Cvae=4, num_classes=2, depth=1, embed_dim=32, num_heads=2,
                        patch_nums=(1, 2)))
    var.activation_checkpointing = True
    x = torch.randn(1, var.L - 1, 4)
    with torch.no_grad():  # sampling and the frozen reference never checkpoint (nothing to save)
        out = var(torch.zeros(1, dtype=torch.long), x)
    assert out.grad_fn is None


def _cfg(*overrides):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("world, micro, expected", [(1, None, (8, 1)), (2, None, (4, 1)), (2, 2, (2, 2)),
                                                    (4, 1, (1, 2))])
def test_the_global_batch_is_split_over_processes(world, micro, expected):
    cfg = _cfg("train.global_batch=8", *([f"train.micro_batch={micro}"] if micro else []))
    assert resolve_batch(cfg, world, torch.device("cpu")) == expected


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        resolve_batch(_cfg("train.global_batch=8"), 3, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_batch(_cfg("train.global_batch=8", "train.micro_batch=4"), 4, torch.device("cpu"))


def test_without_a_global_batch_the_per_process_settings_stand():
    assert resolve_batch(_cfg("train.batch_size=5", "train.grad_accum=3"), 2, torch.device("cpu")) == (5, 3)
    with pytest.raises(ConfigError, match="needs train.global_batch"):
        _cfg("train.micro_batch=4")


def test_batch_indices_draw_one_permutation_per_epoch(monkeypatch):
    import var_mclr.batches as batches

    batches.epoch_permutation.cache_clear()
    draws = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(a) or real(*a, **k))
    n, gb = 10, 4
    got = torch.cat([batches.batch_indices(7, i, gb, n) for i in range(5)])  # 20 positions: epochs 0 and 1
    assert len(draws) == 2
    expected = torch.cat([real(n, generator=torch.Generator().manual_seed(7 * 7_919 + e)) for e in (0, 1)])
    assert torch.equal(got, expected)  # the same stream as before: resumed runs and old runs read the same order


def _folder(root, per_class=3):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")


def test_an_image_folder_is_verified_once_then_read_from_the_index(tmp_path, monkeypatch):
    from var_mclr import data

    _folder(tmp_path / "train")
    opened = []
    real = data._is_readable
    monkeypatch.setattr(data, "_is_readable", lambda p: opened.append(p) or real(p))
    cache = str(tmp_path / "index_cache")
    first = data.ImageFolderDataset(str(tmp_path / "train"), 8, train=True, index_cache=cache)
    assert len(opened) == 6
    data._SCANNED.clear()  # another process: nothing in memory, the index on disk
    second = data.ImageFolderDataset(str(tmp_path / "train"), 8, train=True, index_cache=cache)
    assert len(opened) == 6 and second.samples == first.samples
    (tmp_path / "train" / "a" / "0.png").unlink()  # the class directory changed: scanned again
    third = data.ImageFolderDataset(str(tmp_path / "train"), 8, train=True, index_cache=cache)
    assert len(third) == 5 and len(opened) == 11


def test_verification_is_a_setting(tmp_path, monkeypatch):
    from var_mclr import data

    _folder(tmp_path / "train")
    monkeypatch.setattr(data, "_is_readable", lambda p: pytest.fail("data.verify = false opened a file"))
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path}", "data.num_classes=2",
                             "data.verify=false"])
    args = data.dataset_args(cfg.to_dict()["data"])
    assert args["verify"] is False and len(data.build_dataset(args, "train")) == 6


def test_a_global_batch_trains_like_one_micro_batch_and_is_logged(tmp_path, caplog):
    import logging

    from safetensors.torch import load_file
    from test_train import tiny_run_tree, write_cfg
    from var_mclr.train import train

    whole = tiny_run_tree(tmp_path, "whole", steps=3, batch_size=8)
    split = tiny_run_tree(tmp_path, "split", steps=3, global_batch=8, micro_batch=4)
    with caplog.at_level(logging.INFO, logger="var_mclr.train"):
        a = load_file(train(load_config(write_cfg(tmp_path, whole, "whole"))))
        b = load_file(train(load_config(write_cfg(tmp_path, split, "split"))))
    assert "global batch 8 = micro-batch 4 x 1 processes x 2 accumulation; peak lr 0.003" in caplog.text
    assert "world size 1" in caplog.text
    for k in a:  # the same images per step, the loss averaged over two halves instead of at once
        assert torch.allclose(a[k], b[k], atol=1e-4), k


class _Props:
    total_memory = 80 * 2 ** 30  # an 80 GB GPU


def test_on_cuda_a_config_that_does_not_fit_is_refused_naming_the_keys(monkeypatch):
    from pathlib import Path

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    cfgs = Path(__file__).resolve().parents[1] / "configs"
    big = load_config(cfgs / "var_d30.yaml", ["train.micro_batch=16"], check_files=False)
    with pytest.raises(ConfigError, match=r"needs 1\d\d\.\d GiB per GPU.*train\.micro_batch=\d+ \(or auto\)"):
        resolve_batch(big, 8, torch.device("cuda"))
    auto = load_config(cfgs / "var_d30.yaml", ["train.micro_batch=auto"], check_files=False)
    micro, accum = resolve_batch(auto, 8, torch.device("cuda"))
    assert micro * 8 * accum == 256 and micro >= 2  # the largest that fits (tests/test_plan.py checks "largest")


def _poisoned_run(tmp_path, monkeypatch, name: str, device_skip: bool, bad_calls, **train_overrides):
    """A tiny run whose loss is NaN at the given objective_loss calls, with the fused AdamW, the host deciding each
    step (device_skip False, the CPU's way) or the device skipping and the host reading the flags at log steps."""
    import var_mclr.train as train_mod
    from safetensors.torch import load_file
    from test_train import tiny_run_tree, write_cfg

    real_loss, real_opt = train_mod.objective_loss, train_mod.make_optimizer
    calls = {"n": 0}

    def poisoned(cfg, *args):
        loss, stats = real_loss(cfg, *args)
        calls["n"] += 1
        return (loss * float("nan") if bad_calls(calls["n"]) else loss), stats

    def fused(cfg, var):
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in real_opt(cfg, var).param_groups]
        return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=True)
    monkeypatch.setattr(train_mod, "objective_loss", poisoned)
    monkeypatch.setattr(train_mod, "make_optimizer", fused)
    monkeypatch.setattr(train_mod, "device_skip_available", lambda *a: device_skip)
    tree = tiny_run_tree(tmp_path, name, steps=10, **train_overrides)
    tree["run"].update(log_every=4, ckpt_every=100)
    return load_file(train_mod.train(load_config(write_cfg(tmp_path, tree, name))))


def test_a_step_skipped_on_the_device_is_the_step_the_host_skips(tmp_path, monkeypatch):
    bad = {3, 7}.__contains__  # isolated non-finite steps, read back only at log steps (every 4th)
    host = _poisoned_run(tmp_path, monkeypatch, "host", False, bad)
    device = _poisoned_run(tmp_path, monkeypatch, "device", True, bad)
    for k in host:
        assert torch.equal(host[k], device[k]), k


def test_a_run_of_non_finite_steps_still_stops_when_skipped_on_the_device(tmp_path, monkeypatch):
    from var_mclr.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row at step [4-9]"):
        _poisoned_run(tmp_path, monkeypatch, "stop", True, lambda n: n >= 3, max_nonfinite_in_row=3)


@pytest.mark.slow
def test_one_config_on_one_and_two_processes_follows_the_same_loss_curve(tmp_path):
    """train.global_batch is the recipe's unit: one config file, one process accumulating two micro-batches or two
    processes one each, the same images per step and the same losses; each run logs what it derived."""
    import sys
    from pathlib import Path

    from test_train import metrics, run_cli, tiny_run_tree, write_cfg

    repo = Path(__file__).resolve().parents[1]
    tree = tiny_run_tree(tmp_path, "one", objective="nll", steps=4, global_batch=8, micro_batch=4)
    cfg = write_cfg(tmp_path, tree, "cfg")
    p1 = run_cli(cfg)
    assert p1.wait(timeout=300) == 0
    log1 = p1.stderr.read()
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583",
                str(repo / "var_mclr" / "train.py"))
    p2 = run_cli(cfg, "--set", f"run.out_dir={tmp_path / 'two'}", launcher=launcher)
    assert p2.wait(timeout=300) == 0
    log2 = p2.stderr.read()
    assert "world size 1" in log1 and "micro-batch 4 x 1 processes x 2 accumulation" in log1
    assert "world size 2" in log2 and "micro-batch 4 x 2 processes x 1 accumulation" in log2
    l1 = [r["loss"] for r in metrics(tmp_path / "one")]
    l2 = [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(l1) == len(l2) == 4 and l1[0] != l1[-1]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
