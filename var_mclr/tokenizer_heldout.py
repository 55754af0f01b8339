"""The tokenizer's training length follows the data (docs/method.md, "Training length"): with run.eval_every > 0,
every that many steps the reconstruction MSE of up to run.eval_images held-out images (the images their multi-scale
tokens decode to) is measured; tokenizer_train.steps becomes a ceiling, training stops once PATIENCE evaluations in a
row have not improved on the reference by MIN_GAIN, and the result is the weights of the lowest held-out MSE
(best.safetensors while training).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from tokenizer.model import VQVAE
from var_mclr.checkpoints import load_model, save_model
from var_mclr.data import build_dataset, dataset_tensors, spread_indices

log = logging.getLogger("var_mclr.tokenizer_heldout")

PATIENCE = 3  # evaluations without a MIN_GAIN improvement before training stops
MIN_GAIN = 0.01  # relative: a 1% lower held-out MSE counts as still improving


class ReconstructionStopper:
    """Held-out reconstruction tracking and early stopping of one tokenizer run; its state goes into every training
    checkpoint (state()) and comes back on resume (restore())."""

    def __init__(self, data_args: dict, max_images: int):
        ds = build_dataset(data_args, "val", deterministic=True)
        self.images_N3HW, _ = dataset_tensors(ds, spread_indices(len(ds), max_images))
        self.best: dict | None = None  # {"step", "heldout_mse"} of best.safetensors
        self.reference: float | None = None  # the value the next evaluation must beat by MIN_GAIN
        self.since = 0

    @property
    def stopped(self) -> bool:
        return self.since >= PATIENCE

    def state(self) -> dict:
        return {"best": self.best, "reference": self.reference, "since": self.since}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.reference, self.since = state["best"], state["reference"], state["since"]

    @torch.no_grad()
    def heldout_mse(self, vae: VQVAE, batch_size: int = 256) -> float:
        was_training = vae.training
        vae.eval()
        try:
            total = 0.0
            for s in range(0, len(self.images_N3HW), batch_size):
                x = self.images_N3HW[s:s + batch_size].to(next(vae.parameters()).device)
                rec = vae.idxBl_to_img(vae.img_to_idxBl(x), same_shape=True, last_one=True)
                total += float((rec - x).pow(2).mean(dim=(1, 2, 3)).sum())
            return total / len(self.images_N3HW)
        finally:
            vae.train(was_training)

    def update(self, vae: VQVAE, step: int, out_dir: Path) -> bool:
        """Evaluate after `step`; a new lowest MSE saves best.safetensors. True: training should stop."""
        mse = self.heldout_mse(vae)
        if self.best is None or mse < self.best["heldout_mse"]:
            self.best = {"step": step, "heldout_mse": mse}
            save_model(vae, out_dir / "best.safetensors", extra={"selected": self.best})
        if self.reference is None or mse < self.reference * (1 - MIN_GAIN):
            self.reference, self.since = mse, 0
        else:
            self.since += 1
        log.info("step %d held-out reconstruction MSE %.5f (best %.5f at step %d%s)", step, mse,
                 self.best["heldout_mse"], self.best["step"],
                 f"; no {MIN_GAIN:.0%} gain for {self.since} evaluations" if self.since else "")
        return self.stopped

    def load_best(self, vae: VQVAE, out_dir: Path) -> dict:
        """Put the weights of the lowest held-out MSE into vae; returns which they are."""
        vae.load_state_dict(load_model(out_dir / "best.safetensors").state_dict())
        log.info("tokenizer: the result is the weights after step %d (held-out reconstruction MSE %.5f)",
                 self.best["step"], self.best["heldout_mse"])
        return self.best
