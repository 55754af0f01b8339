"""The objective registry (var_mclr/objectives/): one file per objective, listed once, and the config's loss
section built from that list with each objective's own value rules."""
from __future__ import annotations

import dataclasses

import pytest

from var_mclr.config import ConfigError, load_config
from var_mclr.objectives import OBJECTIVES, REGISTERED, LossConfig


def test_the_loss_section_is_the_registry():
    assert list(OBJECTIVES) == list(REGISTERED)
    sections = {f.name: f.type for f in dataclasses.fields(LossConfig)}
    assert sections == {o.name: o.settings for o in OBJECTIVES.values() if o.settings is not None}
    for name, settings in sections.items():  # each section is declared in its objective's file
        assert settings.__module__ == f"var_mclr.objectives.{name}"


FLOAT_SETTINGS = [(o.name, f.name) for o in OBJECTIVES.values() if o.settings is not None
                  for f in dataclasses.fields(o.settings) if "float" in str(f.type)]  # annotations are strings


@pytest.mark.parametrize("section,key", FLOAT_SETTINGS, ids=[f"{s}.{k}" for s, k in FLOAT_SETTINGS])
def test_every_number_of_every_objective_has_a_rule(section, key):
    # NaN passes no range check: a setting without a rule would load and train with it.
    with pytest.raises(ConfigError, match=rf"loss\.{section}\.{key}\b"):
        load_config(None, [f"loss.{section}.{key}=.nan"], check_files=False)


def test_the_selected_objective_needs_two_classes_unless_it_is_nll():
    for name, o in OBJECTIVES.items():
        overrides = [f"train.objective={name}", "data.num_classes=1", "loss.mclr.tau=0.5", "model.strength_cond=true"]
        if o.contrasts_classes:
            with pytest.raises(ConfigError, match=f"train.objective = {name} contrasts"):
                load_config(None, overrides, check_files=False)
        else:
            load_config(None, overrides, check_files=False)
