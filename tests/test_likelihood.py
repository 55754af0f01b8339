"""Exact likelihoods of a tiny VAR, batched multi-class evaluation, implicit classifier, negative samplers."""
from __future__ import annotations

import itertools

import pytest
import torch

from tokenizer.quant import VectorQuantizer2
from var_mclr.likelihood import (cca_labels, implicit_classifier_logprobs, loglik, loglik_all_classes,
                                 loglik_under_classes, sample_negatives, token_logprobs_of)
from var_mclr.model import VAR

NUM_CLASSES = 3


def tiny_var_and_quant(V: int, patch_nums=(1, 2), seed: int = 0):
    torch.manual_seed(seed)
    var = VAR(vocab_size=V, Cvae=4, num_classes=NUM_CLASSES, depth=2, embed_dim=16, num_heads=2,
              patch_nums=patch_nums)
    with torch.no_grad():  # sharpen the head and the class embedding so distributions differ visibly by class
        var.head.weight.mul_(4.0)
        var.class_emb.weight.mul_(8.0)
    quant = VectorQuantizer2(vocab_size=V, Cvae=4, v_patch_nums=patch_nums)
    return var.eval(), quant.eval()


def teacher_forcing(quant, idx_BL: torch.Tensor, patch_nums) -> torch.Tensor:
    ms_idx, start = [], 0
    for pn in patch_nums:
        ms_idx.append(idx_BL[:, start:start + pn * pn])
        start += pn * pn
    with torch.no_grad():
        return quant.idxBl_to_var_input(ms_idx)


@pytest.fixture(scope="module")
def tiny():
    var, quant = tiny_var_and_quant(V=4)
    g = torch.Generator().manual_seed(1)
    idx_BL = torch.randint(0, var.V, (6, var.L), generator=g)
    return var, quant, idx_BL, teacher_forcing(quant, idx_BL, var.patch_nums)


# ---- exactness -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V,patch_nums,seed,classes", [
    (3, (1, 2), 0, (0, 1, 2, NUM_CLASSES)),
    (4, (1, 2), 1, (0, 1, 2, NUM_CLASSES)),
    (2, (1, 2, 3), 2, (1, NUM_CLASSES)),  # 2^14 sequences: three scales, so scale 3's input mixes scales 1 and 2
])
def test_exact_normalisation_over_all_sequences(V, patch_nums, seed, classes):
    """sum over all V^L token sequences of p(x | c) is 1 for every class, the null class included."""
    var, quant = tiny_var_and_quant(V, patch_nums, seed)
    idx_NL = torch.tensor(list(itertools.product(range(V), repeat=var.L)))
    x_NLC = teacher_forcing(quant, idx_NL, patch_nums)
    classes = torch.tensor(classes)
    with torch.no_grad():
        l_NK = loglik_under_classes(var, classes.expand(len(idx_NL), -1), x_NLC, idx_NL)
    total_K = torch.logsumexp(l_NK.double(), dim=0)
    torch.testing.assert_close(total_K, torch.zeros_like(total_K), atol=2e-5, rtol=0)
    # non-trivial: the model is far from uniform and the classes really differ
    assert float(l_NK.std()) > 0.5
    assert float((l_NK[:, 0] - l_NK[:, 1]).abs().max()) > 0.1


def test_token_logprobs_match_log_softmax_of_forward(tiny):
    var, _, idx_BL, x = tiny
    label_B = torch.tensor([0, 1, 2, 3, 0, 3])
    with torch.no_grad():
        expected_BL = torch.log_softmax(var(label_B, x), -1).gather(-1, idx_BL.unsqueeze(-1)).squeeze(-1)
        logp_BL = token_logprobs_of(var, label_B, x, idx_BL)
        l_B = loglik(var, label_B, x, idx_BL)
    assert logp_BL.shape == idx_BL.shape and logp_BL.dtype == torch.float32
    torch.testing.assert_close(logp_BL, expected_BL, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_B, expected_BL.sum(-1), atol=1e-5, rtol=1e-5)


def test_loglik_under_classes_equals_separate_passes_and_chunks(tiny):
    var, _, idx_BL, x = tiny
    classes_BK = torch.tensor([[0, 1, 3], [2, 2, 0], [1, 3, 3], [0, 0, 0], [3, 1, 2], [2, 0, 1]])
    var.zero_grad()
    l_BK = loglik_under_classes(var, classes_BK, x, idx_BL)
    l_BK.sum().backward()
    grads = {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}
    # gradients reach the head, the class embedding and the transformer blocks
    assert {"head.weight", "class_emb.weight"} <= set(grads) and any(n.startswith("blocks.0.") for n in grads)
    assert float(grads["class_emb.weight"].abs().sum()) > 0

    with torch.no_grad():
        per_class = torch.stack([loglik(var, classes_BK[:, k], x, idx_BL) for k in range(3)], dim=1)
    torch.testing.assert_close(l_BK.detach(), per_class, atol=1e-5, rtol=1e-5)

    var.zero_grad()
    l_chunked = loglik_under_classes(var, classes_BK, x, idx_BL, max_rows=5)
    l_chunked.sum().backward()
    torch.testing.assert_close(l_chunked.detach(), l_BK.detach(), atol=1e-5, rtol=1e-5)
    for n, p in var.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
    var.zero_grad()

    with torch.no_grad():
        all_BC = loglik_all_classes(var, x, idx_BL, include_null=True, max_rows=7)
    assert all_BC.shape == (6, NUM_CLASSES + 1)
    torch.testing.assert_close(all_BC[0, [0, 1, 3]], l_BK[0].detach(), atol=1e-5, rtol=1e-5)


# ---- the implicit classifier ------------------------------------------------------------------------------------
def test_implicit_classifier_is_the_posterior_of_the_models_own_joint():
    """Over every token sequence of a tiny VAR, the joint p(x, c) = p(x | c) / C of class-by-class passes gives
    the Bayes posterior; implicit_classifier_logprobs of loglik_all_classes (one batched pass, null column last)
    must equal it, and it is calibrated: sum_x p(x) p(c | x) = 1/C, which needs normalised likelihoods."""
    var, quant = tiny_var_and_quant(V=3, patch_nums=(1, 2), seed=3)
    idx_NL = torch.tensor(list(itertools.product(range(var.V), repeat=var.L)))
    x = teacher_forcing(quant, idx_NL, var.patch_nums)
    with torch.no_grad():
        l_NC1 = loglik_all_classes(var, x, idx_NL, include_null=True, max_rows=100).double()
        separate_NC = torch.stack([loglik(var, torch.full((len(idx_NL),), c), x, idx_NL)
                                   for c in range(NUM_CLASSES)], 1).double()
    joint_NC = separate_NC.exp() / NUM_CLASSES
    posterior_NC = joint_NC / joint_NC.sum(1, keepdim=True)
    logp_NC = implicit_classifier_logprobs(l_NC1[:, :NUM_CLASSES])
    torch.testing.assert_close(logp_NC.exp(), posterior_NC, atol=1e-5, rtol=0)
    marginal_N = joint_NC.sum(1)
    torch.testing.assert_close(marginal_N @ logp_NC.exp(), torch.full((NUM_CLASSES,), 1 / NUM_CLASSES,
                                                                      dtype=torch.float64), atol=2e-5, rtol=0)
    # non-trivial: the classes separate (the posterior of the true class averages well above 1/C)
    assert float(((separate_NC.exp() * logp_NC.exp()).sum(0)).min()) > 1 / NUM_CLASSES + 0.05


def test_implicit_classifier_is_bayes_with_uniform_prior():
    l_BC = torch.tensor([[-10.0, -12.0, -10.0], [-500.0, -400.0, -450.0]])
    p = implicit_classifier_logprobs(l_BC).exp()
    torch.testing.assert_close(p[0], torch.tensor([1, torch.e**-2, 1]) / (2 + torch.e**-2))
    torch.testing.assert_close(p[1], torch.softmax(torch.tensor([-100.0, 0.0, -50.0]), 0))


# ---- negative samplers --------------------------------------------------------------------------------------------
def test_uniform_negatives_are_exactly_uniform_over_wrong_classes():
    C, N = 5, 40000
    g = torch.Generator().manual_seed(0)
    label_B = torch.full((N,), 2)
    neg_BK, coll_BK = sample_negatives(label_B, C, K=1, mode="uniform", generator=g)
    assert neg_BK.shape == (N, 1) and neg_BK.dtype == torch.long and not bool(coll_BK.any())
    counts = torch.bincount(neg_BK.flatten(), minlength=C).double() / N
    assert counts[2] == 0
    # each of the C-1 = 4 wrong classes gets 1/4; binomial sd is 0.0022, 5 sd tolerance
    torch.testing.assert_close(counts[[0, 1, 3, 4]], torch.full((4,), 0.25, dtype=torch.float64), atol=0.011, rtol=0)

    labels = torch.randint(0, C, (N,), generator=g)
    neg_BK, coll_BK = sample_negatives(labels, C, K=3, mode="uniform", generator=g)
    assert neg_BK.shape == (N, 3) and not bool((neg_BK == labels[:, None]).any())
    assert int(neg_BK.min()) >= 0 and int(neg_BK.max()) < C


def test_uniform_negatives_of_null_labels_cover_all_classes():
    C, N = 4, 20000
    neg_BK, coll = sample_negatives(torch.full((N,), C), C, K=1, mode="uniform",
                                    generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(neg_BK.flatten(), minlength=C + 1).double() / N
    assert counts[C] == 0 and not bool(coll.any())
    torch.testing.assert_close(counts[:C], torch.full((C,), 0.25, dtype=torch.float64), atol=0.015, rtol=0)


def test_negatives_are_reproducible_with_a_generator():
    labels = torch.arange(10) % 7
    a, _ = sample_negatives(labels, 7, K=2, mode="mixed", generator=torch.Generator().manual_seed(5))
    b, _ = sample_negatives(labels, 7, K=2, mode="mixed", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_roll_negatives_and_collisions():
    labels = torch.tensor([3, 3, 5, 1])
    neg_BK, coll_BK = sample_negatives(labels, 10, K=1, mode="roll")
    assert torch.equal(neg_BK[:, 0], torch.roll(labels, -1)) and torch.equal(neg_BK[:, 0], torch.tensor([3, 5, 1, 3]))
    assert coll_BK[:, 0].tolist() == [True, False, False, False]
    neg_BK, coll_BK = sample_negatives(labels, 10, K=3, mode="roll")
    assert neg_BK.tolist() == [[3, 5, 1], [5, 1, 3], [1, 3, 3], [3, 3, 5]]
    assert coll_BK.tolist() == [[True, False, False], [False, False, True], [False, False, False],
                                [False, False, False]]


def test_null_and_mixed_negatives():
    C, N = 6, 20000
    labels = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(0))
    neg, coll = sample_negatives(labels, C, K=2, mode="null")
    assert bool((neg == C).all()) and not bool(coll.any())
    neg, coll = sample_negatives(labels, C, K=2, mode="mixed", generator=torch.Generator().manual_seed(1))
    is_null = neg == C
    assert abs(float(is_null.double().mean()) - 0.5) < 0.015
    assert not bool((neg == labels[:, None]).any()) and not bool(coll.any())
    with pytest.raises(ValueError):
        sample_negatives(labels, C, mode="bogus")


def test_cca_labels_mask_and_collision_rule():
    labels = torch.tensor([3, 3, 5, 1, 7, 2, 2, 9])
    pos, neg, neg_is_pos = cca_labels(labels, 10)
    assert torch.equal(pos, labels) and torch.equal(neg, torch.roll(labels, -1))
    assert neg_is_pos.tolist() == [True, False, False, False, False, True, False, False]

    g = torch.Generator().manual_seed(0)
    pos, neg, neg_is_pos = cca_labels(torch.arange(1000) % 10, 10, uncond_ratio=0.1, generator=g)
    masked = pos == 10
    assert 0.07 < float(masked.double().mean()) < 0.13
    assert torch.equal(neg == 10, masked)  # both labels of a masked sample are null, never only one
    assert torch.equal(neg_is_pos, masked)  # arange % 10 rolled never collides, so only masked ones flip


# ---- end to end: images -> tokens -> MCLR steps ----------------------------------------------------------------
def test_mclr_steps_on_encoded_images_raise_the_log_ratio(vae, var):
    """A few MCLR steps on tokenised images raise l(x, c) - l(x, c') on that batch while the cap holds the
    capped share in check; the same steps with lam = 0 (nll) change the ratio far less."""
    from var_mclr.losses import mclr_loss

    g = torch.Generator().manual_seed(0)
    img = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    label_B = torch.arange(8) % var.num_classes
    ms_idx = vae.img_to_idxBl(img)
    with torch.no_grad():  # the tokenizer is frozen: its teacher-forcing features carry no graph
        idx_BL, x = torch.cat(ms_idx, 1), vae.quantize.idxBl_to_var_input(ms_idx)
    neg_BK, _ = sample_negatives(label_B, var.num_classes, K=2, mode="uniform", generator=g)
    classes_BK = torch.cat([label_B.view(-1, 1), neg_BK], 1)  # the true class first, then the K negatives
    state = {k: v.clone() for k, v in var.state_dict().items()}

    def ratio_after(lam, steps=5):
        var.load_state_dict(state)
        opt = torch.optim.Adam(var.parameters(), lr=3e-3)
        for _ in range(steps):
            l_BK = loglik_under_classes(var, classes_BK, x, idx_BL)
            loss, stats = mclr_loss(l_BK[:, 0], l_BK[:, 1:], var.L, lam=lam, tau=0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return mean_log_ratio(), stats

    def mean_log_ratio():
        with torch.no_grad():
            l_BK = loglik_under_classes(var, classes_BK, x, idx_BL)
        return float((l_BK[:, :1] - l_BK[:, 1:]).mean())

    before = mean_log_ratio()
    after_mclr, stats = ratio_after(lam=5.0)
    after_nll, _ = ratio_after(lam=0.0)
    var.load_state_dict(state)
    assert after_mclr > before + 1.0
    assert after_mclr - before > 2 * abs(after_nll - before)
    assert set(stats) >= {"loss", "nll", "log_ratio", "ratio_acc", "capped_frac"}


def test_all_negatives_score_every_mismatched_class_once():
    label_B = torch.tensor([0, 3, 9, 5])
    neg_BK, collided_BK = sample_negatives(label_B, 10, K=9, mode="all")
    for b, label in enumerate(label_B.tolist()):
        assert sorted(neg_BK[b].tolist()) == [c for c in range(10) if c != label]
    assert not bool(collided_BK.any())
    with pytest.raises(ValueError, match="K must be 9"):
        sample_negatives(label_B, 10, K=3, mode="all")
    with pytest.raises(ValueError, match="null-class"):
        sample_negatives(torch.tensor([10]), 10, K=9, mode="all")


def test_mclr_class_dropout_trains_the_null_class_by_nll_alone():
    from var_mclr.objectives import LossConfig
    from var_mclr.objectives.mclr import plan as plan_mclr
    cfg = LossConfig()
    labels = torch.arange(400) % 10
    plan = plan_mclr(cfg, labels, 10, 0.25, torch.Generator().manual_seed(0))
    dropped = plan.classes_BK[:, 0] == 10
    assert 0.18 < float(dropped.float().mean()) < 0.32
    assert bool(plan.mask_BK[dropped, 1:].all())  # no ratio term for a row without a true class
    assert torch.equal(plan.classes_BK[~dropped, 0], labels[~dropped])
    # without dropout the plan draws exactly what it drew before dropout existed (same generator stream)
    a = plan_mclr(cfg, labels, 10, 0.0, torch.Generator().manual_seed(0))
    neg, _ = sample_negatives(labels, 10, K=1, mode="uniform", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.classes_BK[:, 1:], neg)
