"""eval.metrics: Frechet distance, precision/recall, inception score, class accuracy, ADM .npz I/O."""
import logging

import numpy as np
import pytest
import torch

from eval.metrics import (class_accuracy, feature_statistics, frechet_distance, frechet_distance_of_features,
                          inception_score, knn_radii, load_samples_npz, load_statistics, precision_recall,
                          save_samples_npz, to_uint8_nhwc)

# ---------------------------------------------------------------------------------------------- Frechet distance


def test_fid_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances the distance is |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_set_with_itself_is_zero_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    assert abs(frechet_distance_of_features(feats, feats)) < 1e-6
    noise = torch.randn(feats.shape, generator=g)
    fids = [frechet_distance_of_features(feats, feats + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert abs(fids[0]) < 1e-6
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


def test_fid_singular_covariances_fall_back_to_eps(caplog):
    # Fewer samples than dimensions: rank-deficient covariances. The result must still be finite and >= 0.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 32, generator=g), torch.randn(10, 32, generator=g) + 1.0
    with caplog.at_level(logging.WARNING, logger="eval.metrics"):
        d = frechet_distance_of_features(x, y)
    assert np.isfinite(d) and d > 0


def test_fid_rejects_mismatched_shapes_and_bad_features():
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((3, 2), np.nan))


def test_statistics_round_trip_and_feature_size_check(tmp_path):
    mu, sigma = feature_statistics(np.random.default_rng(0).normal(size=(50, 4)))
    p = str(tmp_path / "ref.npz")
    np.savez(p, mu=mu, sigma=sigma, resolution=np.int64(32))  # the ADM reference-batch keys
    mu2, sigma2 = load_statistics(p, expected_dim=4)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(ValueError, match="feature size 4.*gives 2048"):
        load_statistics(p, expected_dim=2048)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError):
        load_statistics(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------------------------------------- precision / recall


def _naive_precision_recall(real, fake, k):
    d_rr, d_ff, d_fr = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(fake, real)
    r_real = d_rr.sort(1).values[:, k]
    r_fake = d_ff.sort(1).values[:, k]
    precision = (d_fr <= r_real.unsqueeze(0)).any(1).float().mean()
    recall = (d_fr.T <= r_fake.unsqueeze(0)).any(1).float().mean()
    return float(precision), float(recall)


def test_precision_recall_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_partial_overlap_and_chunking_match_brute_force():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 5, generator=g)
    fake = torch.cat([real[:100] + 0.01 * torch.randn(100, 5, generator=g), torch.randn(60, 5, generator=g) + 50])
    p, r = precision_recall(real, fake, k=3, chunk_size=17)  # odd chunk size exercises the ragged last chunk
    assert p == pytest.approx(100 / 160)  # the far cluster is off the real manifold, the near copies on it
    assert 0.5 <= r < 1.0  # fake covers the first half of real and some of the second
    pn, rn = _naive_precision_recall(real, fake, k=3)
    assert (p, r) == pytest.approx((pn, rn))
    # Diversity loss shows up in recall, not precision: a collapsed fake set sits on the manifold but covers little.
    p_c, r_c = precision_recall(real, real[:5].repeat(20, 1), k=3)
    assert p_c == 1.0 and r_c < 0.2


def test_knn_radii_excludes_self():
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    # k = 1: nearest other point; squared distances.
    assert knn_radii(pts, k=1, chunk_size=3).tolist() == [1.0, 1.0, 4.0, 9.0]
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(pts, k=4)


# ---------------------------------------------------------------------------------------------- IS, class accuracy


def test_inception_score_extremes():
    k = 10
    uniform = np.full((1000, k), 1.0 / k)
    assert inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0), abs=1e-9)
    confident_diverse = np.eye(k)[np.arange(1000) % k]
    mean, std = inception_score(confident_diverse, splits=10)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    confident_collapsed = np.eye(k)[np.zeros(1000, dtype=int)]
    assert inception_score(confident_collapsed, splits=5)[0] == pytest.approx(1.0)
    half = np.eye(k)[np.arange(1000) % 2]  # confident, two classes: IS = 2
    assert inception_score(torch.tensor(half), splits=4)[0] == pytest.approx(2.0)


def test_inception_score_validates_input():
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((10, 3)))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((4, 2), 0.5), splits=5)


def test_class_accuracy_from_logits_and_ids():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert class_accuracy(logits, labels) == 0.75
    assert class_accuracy(np.array([0, 1, 1, 1]), labels) == 1.0
    with pytest.raises(ValueError, match="do not match"):
        class_accuracy(torch.tensor([0, 1]), labels)


# ---------------------------------------------------------------------------------------------- ADM .npz


def test_npz_round_trip_in_adm_layout(tmp_path):
    x = torch.rand(6, 3, 8, 10) * 2 - 1
    x[0, :, 0, 0] = torch.tensor([-1.0, 0.0, 1.0])
    arr = to_uint8_nhwc(x)
    assert arr.shape == (6, 8, 10, 3) and arr.dtype == np.uint8
    assert arr[0, 0, 0].tolist() == [0, 128, 255]
    p = str(tmp_path / "samples.npz")
    save_samples_npz(p, arr, labels_N=np.arange(6))
    assert np.array_equal(load_samples_npz(p), arr)
    with np.load(p) as z:  # what ADM's evaluator reads
        assert np.array_equal(z["arr_0"], arr) and z["arr_1"].tolist() == list(range(6))
    assert [f.name for f in tmp_path.iterdir()] == ["samples.npz"]  # no temp files left behind


def test_npz_rejects_wrong_dtype_and_shape(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_samples_npz(str(tmp_path / "a.npz"), np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="N x H x W x 3"):
        save_samples_npz(str(tmp_path / "a.npz"), np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="labels shape"):
        save_samples_npz(str(tmp_path / "a.npz"), np.zeros((2, 4, 4, 3), np.uint8), labels_N=np.arange(3))
    np.savez(tmp_path / "b.npz", arr_0=np.zeros((2, 4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="uint8"):
        load_samples_npz(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        load_samples_npz(str(tmp_path / "c.npz"))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        to_uint8_nhwc(torch.zeros(2, 4, 4, 3))


@pytest.mark.parametrize("n, d", [(20, 50), (40, 40), (10, 300)])
def test_few_sample_frechet_distance_is_the_sqrtm_value(n, d):
    """N <= D: the low-rank form gives what sqrtm of the singular product gives, without a D x D square root."""
    from eval.metrics import frechet_distance_few_samples

    rng = np.random.default_rng(n + d)
    f, r = rng.standard_normal((n, d)), rng.standard_normal((500, d)) * 1.3 + 0.2
    mu2, s2 = feature_statistics(r)
    assert frechet_distance_few_samples(f, mu2, s2) == pytest.approx(
        frechet_distance(*feature_statistics(f), mu2, s2), rel=1e-6)
    with pytest.raises(ValueError, match="N <= D"):
        frechet_distance_few_samples(rng.standard_normal((d + 1, d)), mu2, s2)


def test_frechet_distance_refuses_non_finite_statistics():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(mu, sigma, np.full(3, np.nan), sigma)


def test_reference_images_stream_out_of_the_archive_in_chunks(tmp_path):
    from eval.metrics import iter_samples_npz

    images = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        with open(tmp_path / "ref.npz", "wb") as f:
            save(f, arr_0=images, mu=np.zeros(3))
        chunks = iter_samples_npz(str(tmp_path / "ref.npz"), chunk=3)
        assert next(chunks) == (7, 5, 5, 3)
        parts = list(chunks)
        assert [len(p) for p in parts] == [3, 3, 1] and np.array_equal(np.concatenate(parts), images)
    with open(tmp_path / "f.npz", "wb") as f:
        np.savez(f, arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        next(iter_samples_npz(str(tmp_path / "f.npz")))
