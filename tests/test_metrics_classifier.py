"""eval.networks: the embedded-dataset CNN (shipped, pinned by its tensor hash), local-only Inception, DINOv2 errors."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.models.inception as tvi

from conftest import tf_inception_layout_net
from eval.features import FeatureNet, mnist_net
from eval.networks.dinov2 import load_dinov2
from eval.networks.inception import _TFInceptionA, _TFInceptionE, _TFInceptionEMax, load_inception
from eval.networks.mnist_cnn import (SHIPPED, MnistCNN, evaluate_accuracy, load_or_train_mnist_classifier,
                                     load_shipped_mnist_classifier, train_mnist_classifier)
from eval.metrics import frechet_distance_of_features, precision_recall
from var_mclr.data import mnist_dataset
from var_mclr.files import tensors_sha256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def mnist_clf():
    """The shipped eval classifier (16 px digits): the feature space of every embedded-data FID."""
    return load_shipped_mnist_classifier(16)


def in_batches(fn, x_N3HW):
    return FeatureNet("f", "", "", 0, lambda x: (fn(x), None, None), None, "").outputs(x_N3HW, "cpu").features_ND


def test_shipped_classifier_is_pinned_and_its_recorded_accuracy_holds(mnist_clf):
    model, acc = mnist_clf
    assert acc > 0.96
    x, y = mnist_dataset("val", resolution=16).tensors
    assert evaluate_accuracy(model, x, y) == acc  # recomputed here, in this machine's arithmetic
    assert tensors_sha256(model.state_dict()) == SHIPPED[16][1]
    net, _ = mnist_net(Path("/nonexistent-cache-dir"), 16)  # the shipped network needs no cache and no training
    assert net.weights_sha256 == SHIPPED[16][1] and "shipped" in net.description


def test_a_tampered_shipped_classifier_is_refused(monkeypatch):
    import eval.networks.mnist_cnn as clf

    monkeypatch.setitem(clf.SHIPPED, 16, (SHIPPED[16][0], "0" * 64))
    with pytest.raises(RuntimeError, match="tensor hash"):
        load_shipped_mnist_classifier(16)


def test_training_recipe_learns_the_digits_in_one_epoch():
    model, acc = train_mnist_classifier(seed=0, resolution=16, epochs=1)
    assert acc > 0.85 and not model.training


def test_classifier_features_give_a_sensible_fid(mnist_clf):
    # Real held-out digits must be closer to the train digits than noisy or single-class sets are, and precision /
    # recall must tell fidelity from diversity. (Absolute values are large: unnormalised 128-d features, 500 samples.)
    model, _ = mnist_clf
    train, val = mnist_dataset("train"), mnist_dataset("val")
    f_train = in_batches(model.features, train.tensors[0][:2000])
    f_val = in_batches(model.features, val.tensors[0])
    assert f_val.shape == (500, model.feat_dim)
    noise = torch.randn(val.tensors[0].shape, generator=torch.Generator().manual_seed(0))
    fids = [frechet_distance_of_features(f_train, in_batches(model.features, (val.tensors[0] + s * noise).clamp(-1, 1)))
            for s in (0.0, 0.3, 0.6)]
    assert fids[0] < 0.5 * fids[2] and fids[0] < fids[1] < fids[2], fids
    one_class = train.tensors[0][train.tensors[1] == 3][:400]
    f_one = in_batches(model.features, one_class)
    assert fids[0] < 0.5 * frechet_distance_of_features(f_train, f_one)
    p_one, r_one = precision_recall(f_train, f_one)
    _, r_val = precision_recall(f_train, f_val)
    assert p_one == 1.0  # train digits are on the train manifold ...
    assert r_one < 0.5 < r_val  # ... but a single class covers little of it, held-out digits most of it


def test_classifier_accepts_other_resolutions(mnist_clf):
    model, _ = mnist_clf
    # Any input size is resized to the network's 32 px input; accuracy is only high at the resolution it was trained
    # at (16 px digits here: the blur is part of what it learnt), which is why its cache is keyed by resolution.
    x32, y = mnist_dataset("val", resolution=32).tensors
    assert model.logits(x32[:4]).shape == (4, 10) and model.features(x32[:4]).shape == (4, model.feat_dim)
    with pytest.raises(ValueError, match="expected images"):
        model.features(torch.zeros(2, 32, 32))


def test_stale_cache_is_retrained_not_used(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import eval.networks.mnist_cnn as clf

    p = str(tmp_path / "c.safetensors")
    save_file(MnistCNN().state_dict(), p, metadata={"format": "something-else", "seed": "0"})
    calls = []
    monkeypatch.setattr(clf, "train_mnist_classifier",
                        lambda seed, resolution: (calls.append((seed, resolution)), (MnistCNN(), 0.5))[1])
    _, acc = load_or_train_mnist_classifier(p, seed=0)
    assert calls == [(0, 32)] and acc == 0.5
    _, acc = load_or_train_mnist_classifier(p, seed=0)  # now cached in the current format
    assert calls == [(0, 32)] and acc == 0.5
    load_or_train_mnist_classifier(p, seed=1)  # another seed is another classifier
    load_or_train_mnist_classifier(p, seed=1, resolution=16)  # and so is another data resolution
    assert calls == [(0, 32), (1, 32), (1, 16)]
    with open(p, "wb") as f:
        f.write(b"truncated garbage")
    load_or_train_mnist_classifier(p, seed=1, resolution=16)  # unreadable cache: retrain, do not crash
    assert calls == [(0, 32), (1, 32), (1, 16), (1, 16)]


# ---------------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def fake_fid_inception_file(tmp_path_factory):
    # Random weights in the layout of pytorch-fid's TF-FID port (1008 classes, no aux head): format check only.
    net = tf_inception_layout_net()
    p = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), p)
    return str(p)


def test_inception_loads_local_file_and_gives_pool3_and_logits(fake_fid_inception_file):
    m = load_inception(fake_fid_inception_file)
    assert m.tf_fid and isinstance(m.net.Mixed_7c, _TFInceptionEMax)
    with torch.no_grad():
        pool, logits = m(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # pool3 follows ReLUs


def test_inception_torchvision_layout_with_aux_head(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    m = load_inception(str(tmp_path / "tv.pth"))
    assert not m.tf_fid and type(m.net.Mixed_7c) is tvi.InceptionE
    with torch.no_grad():
        x = torch.rand(1, 3, 299, 299) * 2 - 1
        net.eval()
        # Same network as torchvision's own forward (transform_input off): our layer walk misses nothing.
        assert torch.allclose(m.logits(x), net(x), atol=1e-4)


def test_inception_missing_or_wrong_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_inception(str(tmp_path / "nope.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an Inception-v3"):
        load_inception(str(tmp_path / "other.pth"))


def test_tf_pooling_patches_only_change_the_pool_branch():
    # The TF-FID blocks must wire the same branches as torchvision; only the pool branch differs, and (with a
    # 3x3 pool of stride 1) only on the border pixels for the average-pool blocks.
    torch.manual_seed(0)
    x = torch.randn(1, 192, 9, 9)
    a = tvi.InceptionA(192, pool_features=32).eval()
    with torch.no_grad():
        ref = a(x)
        a.__class__ = _TFInceptionA
        out = a(x)
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(out, ref, atol=1e-5)
    e = tvi.InceptionE(64).eval()
    y = torch.randn(1, 64, 6, 6)
    with torch.no_grad():
        ref = e(y)
        e.__class__ = _TFInceptionE
        assert torch.allclose(e(y)[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)
        e.__class__ = _TFInceptionEMax
        diff = (e(y) - ref).abs().amax(dim=(0, 2, 3))
    assert (diff[:-192] < 1e-5).all() and (diff[-192:] > 1e-3).any()  # only the 192 pool-branch channels move


# ---------------------------------------------------------------------------------------------- DINOv2


def test_dinov2_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dinov2(str(tmp_path / "missing"))
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="transformers"):
            load_dinov2(str(tmp_path))
    if importlib.util.find_spec("timm") is None:
        (tmp_path / "w.pth").write_bytes(b"")
        with pytest.raises(ImportError, match="timm"):
            load_dinov2(str(tmp_path / "w.pth"))
