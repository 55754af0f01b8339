"""An objective's second data source in the same pass as the data batch (Objective.extra_rows; DDO's reference
samples, docs/method.md, "DDO"): the extra rows are appended to the plan's rows, each under its own label, so the
model and the reference each run one forward (and the model one backward) over both."""
from __future__ import annotations

import torch

from var_mclr.objectives.base import ClassPlan, ExtraRows


def with_extra_rows(plan: ClassPlan, idx_BL: torch.Tensor, x_BLCv: torch.Tensor,
                    extra: ExtraRows) -> tuple[ClassPlan, torch.Tensor, torch.Tensor]:
    """The plan's B rows followed by the F extra rows (unflagged): a plan of B + F images, one class each."""
    if plan.classes_BK.shape[1] != 1:
        raise ValueError(f"extra rows need a plan of one class per image, got {plan.classes_BK.shape[1]}")
    label_F1 = extra.label_F.to(plan.classes_BK.device).view(-1, 1)
    joined = ClassPlan(torch.cat((plan.classes_BK, label_F1)),
                       torch.cat((plan.mask_BK, torch.zeros_like(label_F1, dtype=plan.mask_BK.dtype))))
    return joined, torch.cat((idx_BL, extra.idx_FL.to(idx_BL))), torch.cat((x_BLCv, extra.x_FLCv.to(x_BLCv)))
