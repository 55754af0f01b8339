"""ADM's evaluation protocol, piece by piece: stored reference statistics, IS from unbiased logits, class accuracy only
in a known class order, and scores of exactly the uint8 samples that samples.npz holds."""
import json

import numpy as np
import pytest
import torch
import torchvision

from conftest import tf_inception_layout_net, tiny_vae, tiny_var
from eval.features import NetOutputs, Reference, file_reference, inception_net, load_class_map, mnist_net
from eval.fid import evaluate, score
from eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from eval.settings import EvalSettings
from var_mclr.checkpoints import save_model


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_models(tmp_path, num_classes=4):
    vae = tiny_vae()
    save_model(vae, tmp_path / "tok")
    return str(tmp_path / "tok.safetensors"), str(save_model(tiny_var(vae, num_classes=num_classes), tmp_path / "var"))


def random_images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def outputs_by_shard(net, images_NHW3: np.ndarray, shard: int) -> NetOutputs:
    """The network's outputs of saved samples, one sampling shard at a time as evaluate() scores them: a float32
    convolution's result depends on the batch it runs in (1e-5 apart between 12 and 24 images on an AVX-512 CPU), so
    "the same numbers" from a file means the same batches."""
    parts = [net.outputs(torch.from_numpy(images_NHW3[i:i + shard]), "cpu") for i in range(0, len(images_NHW3), shard)]
    return NetOutputs(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                        for f in ("features_ND", "score_probs_NK", "predicted_N")))


# ------------------------------------------------------------------------------------------ reference statistics


def test_reference_with_images_and_statistics_uses_stored_statistics_for_fid(tmp_path, eval_cache):
    net, _ = mnist_net(eval_cache, 16)
    images = random_images(40)
    # Deliberately far from the images' own statistics, so it is plain which ones FID uses.
    stored_mu, stored_sigma = np.full(128, 3.0), 2.0 * np.eye(128)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=stored_mu, sigma=stored_sigma)
    ref = file_reference(net, str(tmp_path / "ref.npz"), 16, "cpu")
    image_feats = net.outputs(torch.from_numpy(images), "cpu").features_ND
    assert np.array_equal(ref.mu, stored_mu) and np.array_equal(ref.sigma, stored_sigma)
    assert torch.equal(ref.features_ND, image_feats)  # precision/recall still against the images
    assert ref.record() == {"source": f"{tmp_path / 'ref.npz'} (40 images)", "fid_statistics": "stored",
                            "precision_recall_images": 40}

    tok, var = tiny_models(tmp_path)
    record = evaluate(EvalSettings(ckpt=var, tokenizer=tok, num_samples=24, batch_size=12,
                                   out_dir=str(tmp_path / "out")), net, ref)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["reference"]["fid_statistics"] == "stored"
    sample_feats = outputs_by_shard(net, np.load(tmp_path / "out" / "samples.npz")["arr_0"], 12).features_ND
    m = record["metrics"]
    assert m["fid"] == pytest.approx(frechet_distance(*feature_statistics(sample_feats), stored_mu, stored_sigma),
                                     rel=1e-9)
    assert m["fid"] != pytest.approx(frechet_distance(*feature_statistics(sample_feats),
                                                      *feature_statistics(image_feats)), rel=1e-3)
    assert (m["precision"], m["recall"]) == precision_recall(image_feats, sample_feats, k=3)


def test_reference_statistics_are_computed_only_when_none_fit(tmp_path, eval_cache, caplog):
    net, _ = mnist_net(eval_cache, 16)
    images = random_images(30)
    feats = net.outputs(torch.from_numpy(images), "cpu").features_ND
    np.savez(tmp_path / "images.npz", arr_0=images)
    ref = file_reference(net, str(tmp_path / "images.npz"), 16, "cpu")
    assert ref.fid_statistics == "computed" and np.allclose(ref.mu, feats.double().mean(0).numpy())
    # Statistics of another network (ADM's are Inception's, 2048-d) next to the images: the images decide.
    np.savez(tmp_path / "other.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    ref = file_reference(net, str(tmp_path / "other.npz"), 16, "cpu")
    assert ref.fid_statistics == "computed" and "computed from the 30 images" in caplog.text
    np.savez(tmp_path / "stats.npz", mu=np.zeros(128), sigma=np.eye(128))
    ref = file_reference(net, str(tmp_path / "stats.npz"), 16, "cpu")
    assert ref.record()["fid_statistics"] == "stored" and ref.record()["precision_recall_images"] is None
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0 images and/or mu, sigma"):
        file_reference(net, str(tmp_path / "empty.npz"), 16, "cpu")


# ------------------------------------------------------------------------------------------ score what is saved


def test_metrics_are_those_of_the_saved_uint8_samples(tmp_path, eval_cache):
    net, _ = mnist_net(eval_cache, 16)
    np.savez(tmp_path / "ref.npz", arr_0=random_images(40, seed=1))
    ref = file_reference(net, str(tmp_path / "ref.npz"), 16, "cpu")
    tok, var = tiny_models(tmp_path)
    record = evaluate(EvalSettings(ckpt=var, tokenizer=tok, num_samples=24, batch_size=12,
                                   out_dir=str(tmp_path / "out")), net, ref)
    z = np.load(tmp_path / "out" / "samples.npz")
    # Scoring the file afresh (uint8 in, as ADM's evaluator reads it) gives the recorded numbers exactly.
    again = score(outputs_by_shard(net, z["arr_0"], 12), torch.from_numpy(z["arr_1"]), net, ref, "cpu", num_classes=4)
    assert {k: record["metrics"][k] for k in again} == again


# ------------------------------------------------------------------------------------------ Inception: IS, classes


def inception_test_images():
    return torch.from_numpy(random_images(6, size=32)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@pytest.fixture(scope="module")
def biased_tf_inception(tmp_path_factory):
    """Random weights in the TF-FID layout (1008 outputs) with a large fc bias that the Inception Score must ignore."""
    from eval.networks.inception import load_inception

    net = tf_inception_layout_net()
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    with torch.no_grad():
        # Random convolutions give nearly equal pool3 vectors: W reads only their differences (orthogonal to the
        # mean), scaled to a few nats, so the unbiased logits tell images apart and the bias (20 nats) swamps them.
        pool = load_inception(str(path)).features(inception_test_images()).double()
        mean = pool.mean(0) / pool.mean(0).norm()
        w = torch.randn(1008, 2048, dtype=torch.float64)
        w -= (w @ mean)[:, None] * mean[None]
        w *= 3.0 / (pool - pool.mean(0)).norm(dim=1).mean()
        net.fc.weight.copy_(w)
        net.fc.bias.normal_(0, 20.0)
    torch.save(net.state_dict(), path)
    return str(path), net.fc.weight.detach().double().numpy(), net.fc.bias.detach().double().numpy()


def hand_inception_score(logits, splits):
    """improved-GAN's / ADM's formula, written out: per split, exp(mean_x KL(p(y|x) || p(y)))."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.split(p, splits):
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * (np.log(q) - np.log(py))) for q in part])))
    return float(np.mean(scores))


def test_inception_score_uses_unbiased_logits_and_tf_weights_give_no_class_accuracy(biased_tf_inception, tmp_path,
                                                                                     monkeypatch):
    path, w, b = biased_tf_inception
    net = inception_net(path, "cpu")
    images = inception_test_images()
    out = net.outputs(images, "cpu")
    pool = out.features_ND.double().numpy()
    hand = hand_inception_score(pool @ w.T, splits=2)
    assert inception_score(out.score_probs_NK, splits=2)[0] == pytest.approx(hand, rel=1e-4)
    assert hand > 1.5 and hand_inception_score(pool @ w.T + b, splits=2) < 1.1  # the bias would change it

    # TF weights: class order unknown, so no class accuracy, and the record says why.
    assert out.predicted_N is None
    ok, note = net.class_accuracy_basis(1000)
    assert not ok and "not in ImageNet folder order" in note and "--class-map" in note
    ref = Reference(pool.mean(0), np.eye(2048), None, "test")
    monkeypatch.setattr("eval.fid.frechet_distance", lambda *stats: 0.0)  # a 2048-d sqrtm takes half a minute here
    metrics = score(out, torch.arange(6), net, ref, "cpu", 1000)
    assert metrics["class_accuracy"] is None and metrics["inception_score"] == pytest.approx(hand_inception_score(
        pool @ w.T, splits=6), rel=1e-4)

    # An explicit map from the user: TF output j + 1 stands for generator label j (output 0 is TF's background).
    (tmp_path / "map.json").write_text(json.dumps([None] + list(range(1000)) + [None] * 7))
    mapped = inception_net(path, "cpu", class_map=str(tmp_path / "map.json"))
    predicted = mapped.outputs(images, "cpu").predicted_N
    argmax = torch.from_numpy(pool @ w.T + b).argmax(1)  # classification uses the full classifier, bias included
    assert torch.equal(predicted, torch.where((argmax >= 1) & (argmax <= 1000), argmax - 1, -1))
    assert mapped.class_accuracy_basis(1000)[0] and mapped.class_accuracy_basis(7)[0]  # the user's map holds


def test_torchvision_weights_are_in_imagenet_order_only_for_1000_class_generators(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    net = inception_net(str(tmp_path / "tv.pth"), "cpu")
    assert torch.equal(net.class_map, torch.arange(1000)) and net.class_accuracy_basis(1000)[0]
    ok, note = net.class_accuracy_basis(10)
    assert not ok and "has 10 classes, not 1000" in note


def test_class_map_files_are_checked(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps([0, 1, None]))
    assert load_class_map(str(p), 3).tolist() == [0, 1, -1]
    with pytest.raises(ValueError, match="list of 4 entries"):
        load_class_map(str(p), 4)
    p.write_text(json.dumps([0, 0, 1]))
    with pytest.raises(ValueError, match="appears twice"):
        load_class_map(str(p), 3)
    p.write_text(json.dumps([0, "tench", 1]))
    with pytest.raises(ValueError, match="integers"):
        load_class_map(str(p), 3)
