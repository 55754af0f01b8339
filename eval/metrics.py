"""Sample-quality metrics on features / class probabilities, and ADM-evaluator .npz I/O.

All functions take numpy arrays or torch tensors and return plain Python floats (or numpy arrays for statistics),
so callers can log them or dump them to JSON directly. The feature network is the caller's choice
(eval/features.py: small MNIST CNN, Inception-v3 pool3, DINOv2); these functions do not care which.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from var_mclr.files import atomic_write

log = logging.getLogger(__name__)


def _as_numpy64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------


def feature_statistics(feats_ND) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of N feature vectors, in float64 (FID is sensitive to precision)."""
    f = _as_numpy64(feats_ND)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance between two Gaussians.

    (S1 S2)^(1/2) comes from scipy.linalg.sqrtm. When the product is (near-)singular, as with fewer samples than
    dimensions, sqrtm returns non-finite values; we then add eps * I to both covariances, the usual remedy. Round-off
    can leave a small imaginary part on a result that is real in exact arithmetic: it is dropped, but a large one
    (the covariances were not PSD) is an error rather than a silently wrong number.
    """
    mu1, mu2 = np.atleast_1d(_as_numpy64(mu1)), np.atleast_1d(_as_numpy64(mu2))
    s1, s2 = np.atleast_2d(_as_numpy64(sigma1)), np.atleast_2d(_as_numpy64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"statistics shapes disagree: mu1 {mu1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {s2.shape}")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: the statistics hold NaN or inf values")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on singular products; the finiteness check below is what decides whether to add eps.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: singular covariance product, adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary component ({max_imag:.3g}); "
                             "are the covariances positive semi-definite?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_few_samples(feats_ND, mu2, sigma2) -> float:
    """The Frechet distance of N <= D features to (mu2, sigma2), exactly and without a D x D square root.

    The features' covariance S1 = A A^T (A = centred features^T / sqrt(N - 1), D x N) has rank < N, and the nonzero
    eigenvalues of S1 S2 are those of the symmetric N x N matrix A^T S2 A, so tr (S1 S2)^(1/2) is the sum of their
    square roots. This is the value frechet_distance approximates through sqrtm of a singular product (its eps
    fallback), at O(D^2 N) instead of O(D^3): small evaluations in 2048-d Inception features take a second, not half
    a minute."""
    f = _as_numpy64(feats_ND)
    mu2, s2 = np.atleast_1d(_as_numpy64(mu2)), np.atleast_2d(_as_numpy64(sigma2))
    n, d = f.shape
    if not 2 <= n <= d or mu2.shape != (d,) or s2.shape != (d, d):
        raise ValueError(f"need 2 <= N <= D features (N={n}, D={d}) and statistics of size D; got mu2 {mu2.shape}, "
                         f"sigma2 {s2.shape}")
    mu1 = f.mean(axis=0)
    a = (f - mu1).T / np.sqrt(n - 1)
    eig = np.linalg.eigvalsh(a.T @ s2 @ a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_of_features(feats1_ND, feats2_MD) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_statistics(feats1_ND), *feature_statistics(feats2_MD))


def load_statistics(path: str, expected_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with keys mu and sigma (ours or an ADM reference batch), shape-checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: expected keys 'mu' and 'sigma', found {sorted(z.files)}")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: its mu/sigma statistics hold NaN or inf values")
    if expected_dim is not None and mu.shape[0] != expected_dim:
        raise ValueError(f"{path}: reference statistics have feature size {mu.shape[0]}, but the feature network "
                         f"gives {expected_dim}; they were computed with a different network")
    return mu, sigma


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019, k-NN manifolds)
# ----------------------------------------------------------------------------------------------------------------


def _sq_dists(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2ab through one matmul (fast); clamp the small negatives that round-off leaves.
    return (a_ND.pow(2).sum(1, keepdim=True) + b_MD.pow(2).sum(1).unsqueeze(0) - 2.0 * a_ND @ b_MD.T).clamp_(min=0)


def knn_radii(feats_ND: torch.Tensor, k: int = 3, chunk_size: int = 2048) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    n = feats_ND.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    out = []
    for s in range(0, n, chunk_size):
        d2 = _sq_dists(feats_ND[s:s + chunk_size], feats_ND)
        # The k+1 smallest include the point itself (distance ~0), so the (k+1)-th is the k-th neighbour.
        out.append(d2.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _inside_manifold(query_MD: torch.Tensor, ref_ND: torch.Tensor, ref_radii_N: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    # A query is on the manifold if it lies within the k-NN ball of at least one reference point.
    hits = []
    for s in range(0, query_MD.shape[0], chunk_size):
        d2 = _sq_dists(query_MD[s:s + chunk_size], ref_ND)
        hits.append((d2 <= ref_radii_N.unsqueeze(0)).any(dim=1))
    return torch.cat(hits)


def precision_recall(real_ND, fake_MD, k: int = 3, chunk_size: int = 2048,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    precision = share of fake samples inside the real manifold (union of real k-NN balls): fidelity;
    recall    = share of real samples inside the fake manifold: coverage/diversity.
    Pairwise distances are computed in row chunks of `chunk_size`, so memory is O(chunk_size * max(N, M)).
    """
    real = torch.as_tensor(real_ND, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake_MD, dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D; got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    with torch.no_grad():
        precision = _inside_manifold(fake, real, knn_radii(real, k, chunk_size), chunk_size).float().mean()
        recall = _inside_manifold(real, fake, knn_radii(fake, k, chunk_size), chunk_size).float().mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------------------------
# Inception score and class accuracy
# ----------------------------------------------------------------------------------------------------------------


def inception_score(probs_NK, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal chunks (p(y) estimated per chunk).

    Ranges from 1 (every prediction equal to the marginal) to K (confident predictions, classes balanced).
    With the MNIST classifier this is the "classifier score", not comparable with ImageNet IS values.
    """
    p = _as_numpy64(probs_NK)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (N, K), got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("rows of probs_NK must be non-negative and sum to 1 (pass softmax(logits))")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        # 0 * log 0 = 0: where p(y|x) = 0 the term vanishes, so clip only inside the log.
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_accuracy(pred, labels_N) -> float:
    """Share of samples classified as the class they were generated for. `pred`: logits (N, K) or ids (N,)."""
    pred = torch.as_tensor(pred)
    labels = torch.as_tensor(labels_N).long()
    if pred.ndim == 2:
        pred = pred.argmax(1)
    if pred.ndim != 1 or pred.shape != labels.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} do not match")
    if labels.numel() == 0:
        raise ValueError("class_accuracy of an empty set")
    return float((pred.long() == labels).float().mean())


# ----------------------------------------------------------------------------------------------------------------
# ADM evaluator .npz (arr_0: N x H x W x 3 uint8)
# ----------------------------------------------------------------------------------------------------------------


def to_uint8_nhwc(images_N3HW: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), rounding like torchvision's save_image."""
    if images_N3HW.ndim != 4 or images_N3HW.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images_N3HW.shape)}")
    x = images_N3HW.detach().float().add(1.0).mul(127.5).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_nhwc(images_NHW3) -> torch.Tensor:
    """uint8 (N, H, W, 3), as an ADM .npz holds images -> float [-1, 1] (N, 3, H, W); to_uint8_nhwc inverts it."""
    x = torch.as_tensor(images_NHW3)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _check_samples(arr: np.ndarray, where: str) -> None:
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: samples must be uint8, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{where}: samples must be N x H x W x 3, got shape {arr.shape}")


def _atomic_savez(path: str, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, **arrays)

    atomic_write(Path(path), write)


def save_samples_npz(path: str, samples_NHW3: np.ndarray, labels_N: np.ndarray | None = None) -> None:
    """Save samples as the ADM evaluator reads them: arr_0 = uint8 N x H x W x 3 (labels, if given, as arr_1)."""
    samples_NHW3 = np.asarray(samples_NHW3)
    _check_samples(samples_NHW3, path)
    arrays = {"arr_0": samples_NHW3}
    if labels_N is not None:
        labels_N = np.asarray(labels_N)
        if labels_N.shape != (samples_NHW3.shape[0],):
            raise ValueError(f"labels shape {labels_N.shape} does not match {samples_NHW3.shape[0]} samples")
        arrays["arr_1"] = labels_N.astype(np.int64)
    _atomic_savez(path, **arrays)


def load_samples_npz(path: str) -> np.ndarray:
    """arr_0 of an ADM-style .npz, checked to be uint8 N x H x W x 3."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path}: no 'arr_0' array (found {sorted(z.files)})")
        arr = z["arr_0"]
    _check_samples(arr, path)
    return arr


def iter_samples_npz(path: str, chunk: int = 500):
    """arr_0 of an ADM-style .npz, checked like load_samples_npz, as (shape, chunks of at most `chunk` images): the
    member is streamed out of the archive, so a 10,000-image 256 px reference batch (2 GB) is never held whole."""
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{path}: no 'arr_0' array (found {sorted(n[:-4] for n in zf.namelist())})")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ValueError(f"{path}: samples must be uint8 N x H x W x 3 (C order), got {dtype} {shape}")
            row = int(np.prod(shape[1:]))
            yield shape
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                yield np.frombuffer(f.read(n * row), dtype=np.uint8).reshape(n, *shape[1:])

