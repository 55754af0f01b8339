"""DDO (docs/method.md, "DDO"): the loss against hand-computed values, gradients only into the trained model, the
reference-sample stage (written as one unit, reloaded, refused when it is not the run's reference), and a tiny run
that resumes bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vae, tiny_var
from test_train import metrics, tiny_run_tree, write_cfg
from var_mclr.builders import tokenizer_record
from var_mclr.checkpoints import save_model, weights_sha256
from var_mclr.config import ConfigError, load_config
from var_mclr.likelihood import loglik
from var_mclr.losses import ddo_loss
from var_mclr.model import VAR, VARConfig
from var_mclr.objectives import OBJECTIVES, objective_loss
from var_mclr.objectives.base import ExtraRows
from var_mclr.plan import rows_per_image
from var_mclr.reference_samples import main, make_reference_samples
from var_mclr.sample_store import SampleSetError, open_reference_samples, read_sample_set, sample_indices
from var_mclr.sampling import SamplingConfig, sample_tokens
from var_mclr.train import train

# Hand-computed with beta = 0.5, alpha = 2 (docs/method.md, "DDO"):
#   data: Delta = (10 - 8, -4 + 2) = (2, -2), d = (1, -1): -log sigmoid(d) = (log(1 + e^-1), log(1 + e)),
#   mean 0.81326169
#   samples: Delta = (-2, 0, -4), d = (-1, 0, -2): -log(1 - sigmoid(d)) = log(1 + e^d) = (0.31326169, 0.69314718,
#   0.12692801) -> mean 0.37777896; loss = 0.81326169 + 2 * 0.37777896
L_DATA, LREF_DATA = [10.0, -4.0], [8.0, -2.0]
L_FAKE, LREF_FAKE = [3.0, 7.0, 1.0], [5.0, 7.0, 5.0]
BETA, ALPHA = 0.5, 2.0
DATA_TERM = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
FAKE_TERM = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(-2))) / 3
EXPECTED = DATA_TERM + ALPHA * FAKE_TERM


def _tensors(requires_grad: bool = False):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)
            for v in (L_DATA, LREF_DATA, L_FAKE, LREF_FAKE)]


def test_loss_matches_the_hand_computed_value():
    assert abs(DATA_TERM - 0.81326169) < 1e-8 and abs(FAKE_TERM - 0.37777896) < 1e-8
    loss, stats = ddo_loss(*_tensors(), beta=BETA, alpha=ALPHA)
    assert loss.item() == pytest.approx(1.56881961, abs=1e-7)
    assert loss.item() == pytest.approx(EXPECTED, abs=1e-12)
    # Plausible deviations all give other numbers: the alpha term subtracted, log sigmoid(d) on the samples
    # (pushing them up), beta outside the sigmoid, beta on l_theta only.
    wrong = {
        "alpha term subtracted": DATA_TERM - ALPHA * FAKE_TERM,
        "samples scored as data": DATA_TERM + ALPHA * (math.log1p(math.e) + math.log(2) + math.log1p(math.e ** 2)) / 3,
        "beta outside": 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2
        + ALPHA * 0.5 * (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(-4))) / 3,
    }
    for name, value in wrong.items():
        assert abs(loss.item() - value) > 1e-3, name
    assert stats["delta_data"].item() == 0.0 and stats["delta_fake"].item() == pytest.approx(-2.0)
    assert stats["real_acc"].item() == 0.5 and stats["fake_acc"].item() == pytest.approx(2 / 3)


def test_gradient_is_the_analytic_one_and_never_reaches_the_reference():
    l_data, lref_data, l_fake, lref_fake = _tensors(requires_grad=True)
    loss, _ = ddo_loss(l_data, lref_data, l_fake, lref_fake, beta=BETA, alpha=ALPHA)
    loss.backward()
    # d loss / d l_data_b = -(beta / B) sigmoid(-d_b); d loss / d l_fake_f = (alpha beta / F) sigmoid(d_f)
    d_data = torch.tensor([1.0, -1.0], dtype=torch.float64)
    d_fake = torch.tensor([-1.0, 0.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(l_data.grad, -BETA / 2 * torch.sigmoid(-d_data))
    torch.testing.assert_close(l_fake.grad, ALPHA * BETA / 3 * torch.sigmoid(d_fake))
    assert lref_data.grad is None and lref_fake.grad is None  # the reference is detached inside the loss


def test_at_the_start_the_loss_is_one_plus_alpha_log_two():
    # The trained model starts as its reference: d = 0 on every row, whatever the likelihoods are.
    l_d, l_f = torch.tensor([-300.0, -250.0]), torch.tensor([-280.0])
    loss, _ = ddo_loss(l_d, l_d.clone(), l_f, l_f.clone(), beta=0.02, alpha=3.0)
    assert loss.item() == pytest.approx(4 * math.log(2), rel=1e-6)


def test_bad_shapes_and_settings_are_refused():
    l = torch.zeros(3)
    with pytest.raises(ValueError, match="lref_data_B"):
        ddo_loss(l, torch.zeros(2), l, l, beta=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        ddo_loss(l, l, l, l, beta=0.0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ddo_loss(l, l, l, l, beta=0.1, alpha=-1.0)


# ---- the registry entry -------------------------------------------------------------------------------------------
def _ddo_cfg(**settings):
    return load_config(None, ["train.objective=ddo", *[f"loss.ddo.{k}={v}" for k, v in settings.items()]],
                       check_files=False)


def test_the_registry_scores_sequences_not_token_means():
    cfg = _ddo_cfg(alpha=ALPHA, beta=BETA)
    l_data, lref_data, l_fake, lref_fake = _tensors()
    # L = 10: an objective that divided by L (a per-token mean) would give another value.
    loss, _ = OBJECTIVES["ddo"].loss(cfg.loss, l_data.view(-1, 1), lref_data.view(-1, 1), torch.zeros(2, 1, dtype=bool),
                                     10, l_fake, lref_fake)
    assert loss.item() == pytest.approx(EXPECTED, abs=1e-12)


def test_settings_have_value_rules_naming_the_key():
    for key, value in (("alpha", -1), ("beta", 0), ("beta", ".inf")):
        with pytest.raises(ConfigError, match=rf"loss\.ddo\.{key} = .* is out of range"):
            _ddo_cfg(**{key: value})
    cfg = _ddo_cfg(alpha=0)  # alpha = 0 is allowed: the data term alone
    assert cfg.loss.ddo.alpha == 0 and cfg.loss.ddo.beta == 0.02


def test_the_ddo_section_is_written_and_names_a_new_stage_once_changed():
    # experiments/stages.py leaves the section out of a stage's name at its defaults (tests/test_stage_names.py).
    from experiments.stages import stage_hash
    at_default = _ddo_cfg()
    assert at_default.to_dict()["loss"]["ddo"]["alpha"] == at_default.loss.ddo.alpha
    assert stage_hash(_ddo_cfg(alpha=2.0)) != stage_hash(at_default)


def test_gradient_reaches_the_trained_model_only(vae):
    cfg = _ddo_cfg(alpha=1.0, beta=0.5)
    var, ref = tiny_var(vae, num_classes=4, seed=0).train(), tiny_var(vae, num_classes=4, seed=1).train()
    for p in ref.parameters():  # left trainable on purpose: only the objective may keep its gradient away
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    idx_BL = torch.randint(0, vae.V, (3, var.L), generator=g)
    idx_FL = torch.randint(0, vae.V, (2, var.L), generator=g)
    x_of = _var_input(vae)
    plan = OBJECTIVES["ddo"].plan(cfg.loss, torch.tensor([0, 1, 2]), 4, 0.0, g)
    extra = ExtraRows(torch.tensor([3, 1]), idx_FL, x_of(idx_FL))
    loss, stats = objective_loss(OBJECTIVES["ddo"], cfg.loss, var, ref, plan, idx_BL, x_of(idx_BL), extra)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert sum(float(p.grad.abs().sum()) for p in var.parameters() if p.grad is not None) > 0
    # The value is ddo_loss of the sequence log-likelihoods of both models, each row under its own label.
    with torch.no_grad():
        want, _ = ddo_loss(loglik(var, torch.tensor([0, 1, 2]), x_of(idx_BL), idx_BL),
                           loglik(ref, torch.tensor([0, 1, 2]), x_of(idx_BL), idx_BL),
                           loglik(var, extra.label_F, extra.x_FLCv, idx_FL),
                           loglik(ref, extra.label_F, extra.x_FLCv, idx_FL), beta=0.5, alpha=1.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert stats["delta_fake"].item() != 0  # the two models differ, so the samples' term was really scored


def _var_input(vae):
    sizes = [pn * pn for pn in vae.patch_nums]
    return lambda idx: vae.quantize.idxBl_to_var_input(list(idx.split(sizes, dim=1)))


# ---- the reference-sample stage -----------------------------------------------------------------------------------
def _saved_reference(tmp_path, seed=0):
    vae = tiny_vae()
    tok = tmp_path / "tok.safetensors"
    if not tok.exists():
        save_model(vae, tok)
    var = tiny_var(vae, num_classes=4, seed=seed)
    ckpt = save_model(var, tmp_path / f"ref{seed}.safetensors", extra={"tokenizer": tokenizer_record(str(tok), vae)})
    return ckpt, vae, var


def test_the_sample_stage_writes_one_unit_records_its_settings_and_reloads(tmp_path):
    ckpt, vae, var = _saved_reference(tmp_path)
    out = tmp_path / "sets" / "r1"
    main(["--ckpt", str(ckpt), "--n-per-class", "3", "--out", str(out), "--batch-size", "5", "--seed", "7"])
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["r1"]  # no temporary directory left behind
    idx_NL, label_N, settings = read_sample_set(out, "--set")
    assert idx_NL.shape == (12, var.L) and label_N.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert settings["sampling"]["guidance"] == "none" and settings["sampling"]["top_k"] == 0
    assert settings["sampling"]["top_p"] == 0.0 and (settings["seed"], settings["batch_size"]) == (7, 5)
    assert settings["source"]["weights_sha256"] == weights_sha256(var)
    assert settings["source"]["tokenizer_weights_sha256"] == weights_sha256(vae)
    # The recorded seeding rule reproduces the second batch (indices 5..9) with the sampler itself.
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 5)
    again = sample_tokens(var.eval(), vae.quantize, label_N[5:10], SamplingConfig(guidance="none"), gen)
    assert torch.equal(torch.cat(again.idx_Bl, 1), idx_NL[5:10].long())
    store = open_reference_samples(str(out), "loss.ddo.samples", var, vae, torch.device("cpu"))
    rows = store.rows(seed=0, micro_index=2, global_batch=4, mine=slice(0, 4))
    torch.testing.assert_close(rows.x_FLCv, _var_input(vae)(rows.idx_FL))
    assert torch.equal(rows.label_F, label_N[_rows_of(store, 0, 2, 4)])


def _rows_of(store, seed, micro, global_batch):
    return sample_indices(seed, micro, global_batch, len(store))


def test_sample_order_is_a_function_of_seed_and_step_and_covers_the_set_each_epoch():
    n, g = 10, 4
    stream = torch.cat([sample_indices(3, m, g, n) for m in range(5)])  # two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:20].tolist()) == list(range(10))
    assert torch.equal(sample_indices(3, 2, g, n), stream[8:12])  # the same micro-batch drawn again (a resume)
    assert not torch.equal(sample_indices(4, 0, g, n), sample_indices(3, 0, g, n))


def test_a_set_from_another_model_or_tokenizer_or_none_at_all_is_refused(tmp_path):
    ckpt, vae, var = _saved_reference(tmp_path)
    out = make_reference_samples(str(ckpt), 1, tmp_path / "set", batch_size=4)
    _, _, other = _saved_reference(tmp_path, seed=1)
    with pytest.raises(SampleSetError, match=r"loss\.ddo\.samples .* not by this run's reference model"):
        open_reference_samples(str(out), "loss.ddo.samples", other, vae, torch.device("cpu"))
    with pytest.raises(SampleSetError, match=r"not by this run's tokenizer"):
        open_reference_samples(str(out), "loss.ddo.samples", var, tiny_vae(seed=1), torch.device("cpu"))
    with pytest.raises(SampleSetError, match=r"loss\.ddo\.samples is not set"):
        open_reference_samples(None, "loss.ddo.samples", var, vae, torch.device("cpu"))
    with pytest.raises(SampleSetError, match=r"loss\.ddo\.samples .* is not a reference-sample set"):
        open_reference_samples(str(tmp_path), "loss.ddo.samples", var, vae, torch.device("cpu"))
    before = (out / "samples.safetensors").read_bytes()
    with pytest.raises(SampleSetError, match=r"--out .* already exists"):
        make_reference_samples(str(ckpt), 2, out)
    assert (out / "samples.safetensors").read_bytes() == before


def test_the_command_line_reports_a_taken_out_directory_in_one_line(tmp_path, capsys):
    ckpt, _, _ = _saved_reference(tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", str(ckpt), "--n-per-class", "1", "--out", str(tmp_path / "taken")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --out ") and not any((tmp_path / "taken").iterdir())


# ---- training -----------------------------------------------------------------------------------------------------
def _ddo_run(tmp_path, name: str, steps: int, samples, init) -> dict:
    tree = tiny_run_tree(tmp_path, name, objective="ddo", steps=steps, lr=1e-3)
    tree["model"]["init"] = str(init)
    tree["loss"] = {"ddo": {"alpha": 1.0, "beta": 0.5, "samples": str(samples)}}
    return tree


def test_a_tiny_ddo_run_trains_and_resumes_bit_for_bit(tmp_path):
    pre = train(load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, "pre", steps=2), "pre")))
    samples = make_reference_samples(str(pre), 8, tmp_path / "pre_samples", batch_size=16)
    full = train(load_config(write_cfg(tmp_path, _ddo_run(tmp_path, "full", 3, samples, pre), "full")))
    rows = metrics(tmp_path / "full")
    # Step 0: the model is its reference, so d = 0 on every row and the loss is (1 + alpha) log 2.
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5) and abs(rows[0]["delta_fake"]) < 1e-4
    assert rows[-1]["delta_data"] > rows[-1]["delta_fake"]  # the discriminator has started to tell them apart
    # Stopped after 2 steps, then resumed to 3: the same weights as the uninterrupted run.
    train(load_config(write_cfg(tmp_path, _ddo_run(tmp_path, "resumed", 2, samples, pre), "resumed2")))
    resumed = train(load_config(write_cfg(tmp_path, _ddo_run(tmp_path, "resumed", 3, samples, pre), "resumed3")))
    a, b = load_file(resumed), load_file(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_refuses_samples_of_another_model_before_writing_anything(tmp_path):
    pre = train(load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, "pre", steps=1), "pre")))
    other, _, _ = _saved_reference(tmp_path, seed=3)  # the same architecture and tokenizer, other weights
    samples = make_reference_samples(str(other), 2, tmp_path / "other_samples", batch_size=8)
    with pytest.raises(SampleSetError, match=r"loss\.ddo\.samples .* not by this run's reference model"):
        train(load_config(write_cfg(tmp_path, _ddo_run(tmp_path, "ddo", 2, samples, pre), "ddo")))
    assert not (tmp_path / "ddo" / "config.yaml").exists() and not (tmp_path / "ddo" / "checkpoints").exists()


def test_the_memory_plan_counts_the_sample_rows():
    assert rows_per_image(_ddo_cfg()) == 2  # each image's row and one reference sample's
    assert rows_per_image(load_config(None, ["train.objective=nll"], check_files=False)) == 1


def test_an_official_layout_var_is_sampled_with_the_tokenizer_it_is_given(tmp_path):
    # An official var_d*.pth holds no tokenizer record: --tokenizer names it, and without it the command stops.
    vae = tiny_vae()
    save_model(vae, tmp_path / "tok")
    var = VAR(VARConfig.official(2, vocab_size=vae.V, Cvae=vae.Cvae, num_classes=3, patch_nums=vae.patch_nums))
    var.init_weights()
    torch.save(var.state_dict(), tmp_path / "var_d2.pth")
    with pytest.raises(SampleSetError, match=r"--ckpt .*var_d2\.pth is an official VAR: name its tokenizer"):
        make_reference_samples(str(tmp_path / "var_d2.pth"), 1, tmp_path / "none")
    out = make_reference_samples(str(tmp_path / "var_d2.pth"), 2, tmp_path / "set", batch_size=4,
                                 tokenizer=str(tmp_path / "tok.safetensors"))
    idx_NL, label_N, settings = read_sample_set(out, "--out")
    assert idx_NL.shape == (6, var.L) and label_N.tolist() == [0, 0, 1, 1, 2, 2]
    assert settings["source"]["weights_sha256"] == weights_sha256(var)
    assert settings["source"]["checkpoint"].endswith("var_d2.pth") and not (tmp_path / "none").exists()


def test_two_processes_share_one_draw_of_samples(tmp_path):
    # Each process takes its slice of the same global draw, as of the data batch: together they score what one would.
    ckpt, vae, var = _saved_reference(tmp_path)
    store = open_reference_samples(str(make_reference_samples(str(ckpt), 2, tmp_path / "set", batch_size=8)),
                                   "loss.ddo.samples", var, vae, torch.device("cpu"))
    one = store.rows(0, 5, 6, slice(0, 6))
    halves = [store.rows(0, 5, 6, slice(r * 3, (r + 1) * 3)) for r in (0, 1)]
    assert torch.equal(torch.cat([h.idx_FL for h in halves]), one.idx_FL)
    assert torch.equal(torch.cat([h.label_F for h in halves]), one.label_F)
