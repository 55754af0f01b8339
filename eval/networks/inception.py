"""Inception-v3 (torchvision's definition) with weights from a local file only: pool3 (2048-d) and logits, for
ImageNet FID / IS. With pytorch-fid's port of the TF FID weights (1008 classes) the TF graph's pooling quirks are
reproduced; with torchvision's ImageNet weights (1000 classes) numbers run ~1-2 FID off published ones.
Images come in [-1, 1] (N, 3, H, W), the project's convention, and are resized here.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.models.inception as tvi

log = logging.getLogger(__name__)

# pytorch-fid's port of the TF FID Inception (the weights behind published FIDs), then torchvision's ImageNet weights.
INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "inception_v3_google-0cc3c7bd.pth")


def find_local_inception_weights() -> str | None:
    """First of INCEPTION_FILENAMES present in the torch hub cache ($TORCH_HOME/hub/checkpoints), else None."""
    ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in INCEPTION_FILENAMES:
        p = os.path.join(ckpt_dir, name)
        if os.path.isfile(p):
            return p
    return None


def _pool_exclude_pad(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores padded zeros; torchvision's counts them.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _TFInceptionA(tvi.InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool_exclude_pad(x))], 1)


class _TFInceptionC(tvi.InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for i in range(1, 6):
            b7d = getattr(self, f"branch7x7dbl_{i}")(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_pool_exclude_pad(x))], 1)


class _TFInceptionE(tvi.InceptionE):
    pool_fn = staticmethod(_pool_exclude_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool_fn(x))], 1)


def _max_pool3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFInceptionEMax(_TFInceptionE):
    # The TF FID graph's last block pools with max, not average (a quirk of that graph, kept for comparability).
    pool_fn = staticmethod(_max_pool3)


def _patch_tf_pooling(net: nn.Module) -> None:
    """Make torchvision's Inception3 compute what the TF FID graph computes. Same parameters, two differences:
    average-pool branches exclude padding (Mixed_5b..5d, 6b..6e, 7b) and Mixed_7c's pool branch is a max-pool.
    Swapping __class__ keeps the loaded parameters and only replaces forward()."""
    swaps = [(("Mixed_5b", "Mixed_5c", "Mixed_5d"), tvi.InceptionA, _TFInceptionA),
             (("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), tvi.InceptionC, _TFInceptionC),
             (("Mixed_7b",), tvi.InceptionE, _TFInceptionE), (("Mixed_7c",), tvi.InceptionE, _TFInceptionEMax)]
    for names, expected, patched in swaps:
        for name in names:
            m = getattr(net, name)
            if type(m) is not expected:
                raise TypeError(f"{name} is a {type(m).__name__}, expected torchvision's {expected.__name__}")
            m.__class__ = patched


class InceptionFeatures(nn.Module):
    """Inception-v3 returning pool3 features (N, 2048) and fc logits (N, 1000 or 1008) for images in [-1, 1].

    Images are resized to 299 x 299 (bilinear, as pytorch-fid does); both supported weight files expect [-1, 1]
    input, so no further normalisation is applied.
    """

    def __init__(self, net: nn.Module, tf_fid: bool):
        super().__init__()
        self.net = net
        self.tf_fid = tf_fid
        self.feat_dim = 2048
        self.num_classes = net.fc.out_features

    def pool3_and_logits(self, x_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = F.interpolate(x_N3HW.float(), size=(299, 299), mode="bilinear", align_corners=False)
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        pool_ND = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool_ND, n.fc(pool_ND)

    def unbiased_logits(self, pool_ND: torch.Tensor) -> torch.Tensor:
        """pool3 @ W without the fc bias: the logits the Inception Score is defined on. The TF graph's
        softmax/logits/MatMul has no bias; improved-GAN's and ADM's evaluators read its W and take that product."""
        return pool_ND @ self.net.fc.weight.T

    def features(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        return self.pool3_and_logits(x_N3HW)[0]

    def logits(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        return self.pool3_and_logits(x_N3HW)[1]

    forward = pool3_and_logits


def load_inception(weights_path: str | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """torchvision's Inception-v3 with weights from a local file; never downloads.

    `weights_path` None means: look in the torch hub cache for INCEPTION_FILENAMES. A 1008-class state dict is
    taken to be the TF FID port and gets the TF pooling patches; a 1000-class one is used as torchvision built it.
    """
    if weights_path is None:
        weights_path = find_local_inception_weights()
        if weights_path is None:
            raise FileNotFoundError(
                "no local Inception weights: pass a path, or place one of "
                f"{', '.join(INCEPTION_FILENAMES)} in {os.path.join(torch.hub.get_dir(), 'checkpoints')} "
                "(this project never downloads weights)")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights file not found: {weights_path} (this project never downloads "
                                "weights; copy the file there first)")
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    if "fc.weight" not in sd:
        raise ValueError(f"{weights_path} is not an Inception-v3 state dict (no 'fc.weight' key)")
    num_classes = sd["fc.weight"].shape[0]
    aux = any(k.startswith("AuxLogits.") for k in sd)
    net = torchvision.models.inception_v3(weights=None, num_classes=num_classes, aux_logits=aux,
                                          transform_input=False, init_weights=False)
    result = net.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{weights_path} does not match torchvision's Inception-v3: missing "
                         f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
    tf_fid = num_classes == 1008
    if tf_fid:
        _patch_tf_pooling(net)
    log.info("loaded Inception-v3 from %s (%d classes, %s pooling)", weights_path, num_classes,
             "TF-FID" if tf_fid else "torchvision")
    return InceptionFeatures(net, tf_fid).eval().requires_grad_(False).to(device)
