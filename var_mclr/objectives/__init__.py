"""The registry of training objectives. Each objective is one file of this package that declares everything about it
(var_mclr/objectives/base.py, Objective): its settings (the config section loss.<name>), their value rules, its
class planner (which classes each image is scored under), its loss, and whether it needs a frozen reference model.
The trainer, the config checker and the benchmarks all read OBJECTIVES, and the loss config is built from it: adding
an objective is its file plus one line of REGISTERED. docs/method.md, "MCLR objective" and "Baselines".

Randomness (class dropout, mismatched classes) is drawn for the global batch from a generator seeded by the step,
then each process takes its slice: one process or many, resumed or not, every sample sees the same classes.
"""
from __future__ import annotations

import dataclasses
from importlib import import_module

import torch

from var_mclr.objectives.base import ClassPlan, ExtraRows, LossFn, Objective, Planner  # noqa: F401 (the interface)
from var_mclr.objectives.cc_dpo import DPOConfig  # noqa: F401
from var_mclr.objectives.cca import CCAConfig  # noqa: F401
from var_mclr.objectives.extra import with_extra_rows
from var_mclr.objectives.mclr import MCLRConfig  # noqa: F401
from var_mclr.objectives.pairs import plan_pairs  # noqa: F401
from var_mclr.objectives.passes import score_rows
from var_mclr.objectives.unlearning import UnlearningConfig  # noqa: F401

# The only list of objectives: module names of this package, in the order the loss sections are written.
REGISTERED = (
    "nll",
    "mclr",
    "cca",
    "cc_dpo",
    "unlearning",
    "ddo",
    "gft",
)
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    import_module(f"{__name__}.{module}").OBJECTIVE for module in REGISTERED)}

# The config's `loss` section: one sub-section loss.<name> per objective with settings, typed by its dataclass.
LossConfig = dataclasses.make_dataclass(
    "LossConfig", [(o.name, o.settings, dataclasses.field(default_factory=o.settings))
                   for o in OBJECTIVES.values() if o.settings is not None])
LossConfig.__module__ = __name__
LossConfig.__doc__ = "loss.<name>: the settings of objective <name> (var_mclr/objectives/<name>.py)."


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective = {name!r} is not one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_errors(cfg) -> list[str]:
    """Every objective's value rules on its own section (each is checked, selected or not, as a later --set may
    select it), and what the selected one needs of the data."""
    errors = []
    selected = OBJECTIVES.get(cfg.train.objective)
    n = cfg.data.num_classes
    if selected is not None and selected.contrasts_classes and n < 2:  # every negative would be the positive
        errors.append(f"train.objective = {selected.name} contrasts each image's class with another class: it "
                      f"needs data.num_classes >= 2, got {n}")
    for o in OBJECTIVES.values():
        if o.settings is not None:
            errors += o.check(getattr(cfg.loss, o.name), cfg, o is selected)
    return errors


def objective_loss(objective: Objective, cfg, var, ref, plan: ClassPlan, idx_BL: torch.Tensor, x_BLCv: torch.Tensor,
                   extra: ExtraRows | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's own passes and loss when it declares them (Objective.score: GFT, the MCLR dial), else one
    teacher-forced pass over every (image, class) row of the plan, then the objective's loss."""
    if objective.score is not None:
        return objective.score(cfg, var, ref, plan, idx_BL, x_BLCv)
    if extra is not None:  # the rows of a second data source (Objective.extra_rows) ride in the same pass
        return _loss_with_extra_rows(objective, cfg, var, ref, plan, idx_BL, x_BLCv, extra)
    l_BK, lref_BK, mask_BK = score_rows(var, ref, plan, idx_BL, x_BLCv, objective.needs_reference)
    return objective.loss(cfg, l_BK, lref_BK, mask_BK, idx_BL.shape[1])


def _loss_with_extra_rows(objective: Objective, cfg, var, ref, plan: ClassPlan, idx_BL: torch.Tensor,
                          x_BLCv: torch.Tensor, extra: ExtraRows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the plan's B rows and the F extra rows, from one pass over B + F rows (docs/method.md, "DDO")."""
    B, L = idx_BL.shape
    l_NK, lref_NK, mask_NK = score_rows(var, ref, *with_extra_rows(plan, idx_BL, x_BLCv, extra),
                                        objective.needs_reference)
    lref_BK, lref_F = (None, None) if lref_NK is None else (lref_NK[:B], lref_NK[B:, 0])
    return objective.loss(cfg, l_NK[:B], lref_BK, mask_NK[:B], L, l_NK[B:, 0], lref_F)
