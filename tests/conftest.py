"""Shared fixtures: tiny tokenizers and VARs built from random weights."""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and other test modules' imports (accelerate, ...) may import
# it before the kernel tests run: without a GPU, every Triton kernel in this process runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Triton's interpreter before 3.7 turns a runtime loop bound into an int the way NumPy 2.4 refuses
    (triton-lang/triton#9171): every kernel test would fail with a TypeError, so say what to install instead."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = tuple(int(p) for p in version("triton").split(".")[:2])
    except PackageNotFoundError:
        return
    numpy_version = tuple(int(p) for p in version("numpy").split(".")[:2])
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_version < (3, 7) and numpy_version >= (2, 4):
        raise pytest.UsageError(f"the Triton {version('triton')} interpreter cannot run the kernel tests with numpy "
                                f"{version('numpy')}: install numpy<2.4 (constraints/floors.txt) or Triton >= 3.7")

from tokenizer import VQVAE, VQVAEConfig  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402

TINY_PATCH_NUMS = (1, 2, 3, 4)


def tiny_vae(patch_nums=TINY_PATCH_NUMS, vocab_size=64, seed=0) -> VQVAE:
    torch.manual_seed(seed)
    # ch_mult of length 3 -> 4x downsampling: 16x16 images for a 4x4 final token map.
    cfg = VQVAEConfig(vocab_size=vocab_size, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                      v_patch_nums=patch_nums)
    return VQVAE(cfg).eval()


def tiny_var(vae: VQVAE, num_classes=5, depth=2, width=64, heads=4, seed=0, **overrides) -> VAR:
    torch.manual_seed(seed)
    cfg = VARConfig(vocab_size=vae.V, Cvae=vae.Cvae, num_classes=num_classes, depth=depth, embed_dim=width,
                    num_heads=heads, patch_nums=vae.patch_nums, **overrides)
    var = VAR(cfg)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0)  # large gates: non-trivial logits
    return var.eval()


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """One cache directory for the eval runs of a session (the 16 px classifier itself ships with the package)."""
    from eval.features import mnist_net

    path = tmp_path_factory.mktemp("eval_cache")
    mnist_net(path, 16)
    return path


@pytest.fixture
def vae():
    return tiny_vae()


@pytest.fixture
def var(vae):
    return tiny_var(vae)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module: CI has 2 shared cores, and OpenMP spin-waiting makes 2-thread
    convolutions several times slower there (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tf_inception_layout_net():
    """Random Inception-v3 weights in the layout of the TF-FID port (1008 classes, no aux head)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
