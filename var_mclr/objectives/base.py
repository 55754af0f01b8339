"""What every objective file declares (var_mclr/objectives/__init__.py holds the registry): the Objective record, the
ClassPlan it returns, and the wording of a value rule, so that every objective reports errors alike."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


@dataclass
class ClassPlan:
    classes_BK: torch.Tensor  # column 0: the positive class; columns 1..: the classes it is contrasted with
    mask_BK: torch.Tensor  # per-column flags: MCLR excludes roll collisions; CCA flags collisions and null-masked rows
    # The strength each image is trained at, drawn with the plan: GFT's beta, the MCLR dial's lambda. None: none drawn.
    strength_B: torch.Tensor | None = None

    def slice(self, sl: slice) -> "ClassPlan":
        return ClassPlan(self.classes_BK[sl], self.mask_BK[sl],
                         None if self.strength_B is None else self.strength_B[sl])


# (loss config, global labels, num_classes, class_dropout, generator) -> the classes every image is scored under
Planner = Callable[[Any, torch.Tensor, int, float, torch.Generator], ClassPlan]
# (loss config, l_BK, reference l_BK or None, flags, L) -> (loss, stats)
LossFn = Callable[[Any, torch.Tensor, "torch.Tensor | None", torch.Tensor, int],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (the objective's own settings, the whole run config, whether train.objective selects it) -> error lines
Checker = Callable[[Any, Any, bool], list[str]]


@dataclass
class ExtraRows:
    """Rows with their own tokens, scored beside the data batch in the same pass (DDO: the reference model's samples,
    docs/method.md, "DDO"). Each row is scored under its own label."""
    label_F: torch.Tensor  # on the host, as a ClassPlan's classes: the pass moves them without a host sync
    idx_FL: torch.Tensor
    x_FLCv: torch.Tensor  # the teacher-forcing input of idx_FL


class RowSource(Protocol):
    def rows(self, seed: int, micro_index: int, global_batch: int, mine: slice) -> ExtraRows:
        """This process's share `mine` of the global micro-batch `micro_index`: a function of (seed, micro_index)
        only, as the data batch is, so a resumed run scores the same rows."""


# (the whole run config, the frozen reference, the tokenizer, the device) -> the objective's second data source, opened
# and checked before the first step. An objective with one has a loss that also takes (l_F, reference l_F) of its rows.
RowOpener = Callable[[Any, Any, Any, torch.device], RowSource]
# (loss config, model, reference or None, this process's plan, idx_BL, x_BLCv) -> (loss, stats): the forward passes
# and the loss of one micro-batch, for an objective that needs more than the plan's l_BK (GFT mixes two passes' logits).
Scorer = Callable[[Any, Any, Any, ClassPlan, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


# (loss config, the starting model, the training TokenStore, num_classes, seed, the saved loss section of a resumed
# run or None) -> the loss config to train with
Preparer = Callable[[Any, Any, Any, int, int, "dict | None"], Any]


def _no_checks(settings, cfg, selected: bool) -> list[str]:
    return []


@dataclass(frozen=True)
class Objective:
    """One training objective. Its file declares all of it; adding an objective is that file plus one line of
    var_mclr/objectives/__init__.py (docs/method.md, "MCLR objective" and "Baselines")."""
    name: str
    plan: Planner
    loss: LossFn | None  # None only with `score`, which computes the loss itself
    settings: type | None = None  # the dataclass of the config section loss.<name>; None: no settings
    check: Checker = _no_checks  # value rules of loss.<name>, run by the config checker before any work
    needs_reference: bool = False  # a frozen copy of the starting model scores the same rows without gradients
    contrasts_classes: bool = True  # scores an image under another class: needs data.num_classes >= 2
    extra_rows: RowOpener | None = None  # a second data source scored beside the data batch (DDO); None: data only
    # None: one teacher-forced pass over the plan's rows, then `loss` (objectives/__init__.py, objective_loss);
    # else this runs the passes and the loss itself.
    score: Scorer | None = None
    # The strength a user names at sampling time (eval --strength) -> the model's strength input, for a model this
    # objective trained with model.strength_cond (GFT: beta itself; the MCLR dial: docs/method.md). None: the input.
    strength_input: Callable[[float], float] | None = None
    # For the memory and time plan (var_mclr/plan.py), an objective whose passes are not one fused-head pass per row:
    # float32 (L, V) logits per row its loss keeps at the peak (GFT: 4, measured), and rows per image the model scores
    # without gradient beside its planned rows (GFT's unconditional target: 1).
    logits_per_row: int = 0
    no_grad_rows: int = 0
    # Settings measured from the starting model before the first step (MCLR's tau: auto, docs/method.md, "The cap");
    # a resumed run passes its saved loss section instead, so they are never re-measured on the fine-tuned model.
    prepare: Preparer | None = None


def positive(v) -> bool:  # finite and > 0
    return math.isfinite(v) and v > 0


def nonnegative(v) -> bool:
    return math.isfinite(v) and v >= 0


def share(v) -> bool:  # [0, 1)
    return 0 <= v < 1


def out_of_range(section: str, settings, rules: list[tuple[str, Callable[[Any], bool], str]]) -> list[str]:
    """One line per rule (key, ok, what it must be) that loss.<section>.key breaks, in config.py's wording."""
    return [f"loss.{section}.{key} = {getattr(settings, key)!r} is out of range: must be {allowed}"
            for key, ok, allowed in rules if not ok(getattr(settings, key))]


def no_flags(label_G: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(label_G, dtype=torch.bool).unsqueeze(1)
