"""DDO (docs/method.md, "DDO"): the loss against hand-computed values, gradients only into the trained model, the
reference-sample stage (written as one unit, reloaded, refused when it is not the run's reference), and a tiny run
that resumes bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

from var_mclr.losses import ddo_loss

# Hand-computed with beta = 0.5, alpha = 2 (docs/method.md, "DDO"):
#   data: Delta = (10 - 8, -4 + 2) = (2, -2), d = (1, -1): -log sigmoid(d) = (log(1 + e^-1), log(1 + e)) -> mean 0.81326169
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
    d_data, d_fake = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([-1.0, 0.0, -2.0], dtype=torch.float64)
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
