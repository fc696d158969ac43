"""The command registry: each command's flat settings, configs built from them with the types
checked, and one-line errors naming the nearest key or command."""

import dataclasses

import pytest

from suffix_analysis.attacks.gcg import GCGConfig
from suffix_analysis.commands import get_command
from suffix_analysis.commands.common import ModelOptions
from suffix_analysis.directions.run import DirectionConfig
from suffix_analysis.errors import UserError


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_flat_settings_are_the_fields_of_the_config_and_its_parts():
    d = get_command("direction").settings
    assert _names(DirectionConfig) <= set(d) and {"model", "device_map", "out", "data_dir"} <= set(d)
    assert d["kl_threshold"].path == ("config", "kl_threshold") and d["device_map"].path == ("model", "placement",
                                                                                             "device_map")
    assert d["n_train"].default == DirectionConfig().n_train and d["model"].default == ModelOptions().model
    gcg = get_command("attack gcg").settings
    assert _names(GCGConfig) <= set(gcg) and "attack" not in gcg and "settings" not in gcg
    assert gcg["num_steps"].aliases == ("steps",)


def test_build_checks_types_and_fills_the_nested_configs():
    cmd = get_command("attack gcg").build({"steps": 3, "search-width": 8, "n_prompts": 2, "model": "m",
                                           "quantize": "8bit", "out": "o"})
    assert cmd.attack == "gcg" and cmd.settings == {"num_steps": 3, "search_width": 8}
    assert cmd.inputs.n_prompts == 2 and cmd.model.model == "m" and cmd.model.placement.quantize == "8bit"
    cfg = get_command("direction").build({"kl_threshold": 1, "out": "o"})  # an int for a float is a float
    assert cfg.config.kl_threshold == 1.0 and isinstance(cfg.config.kl_threshold, float)
    assert cfg.config.n_train == DirectionConfig().n_train


@pytest.mark.parametrize("command,values,needle", [
    ("attack gcg", {"serch-width": 4, "out": "o"}, "unknown key 'serch-width' for this command; did you mean "
                                                   "'search-width'?"),
    ("attack gcg", {"seed": "1", "out": "o"}, "seed must be int, got str '1'"),
    ("attack gcg", {"allow-non-ascii": 1, "out": "o"}, "allow-non-ascii must be bool"),
    ("direction", {"kl_threshold": float("nan"), "out": "o"}, "kl-threshold must be finite"),
    ("refusal", {"limit": {"a": 1}}, "limit: expected one value"),
    ("attack gcg", {}, "the attack gcg command needs out"),
])
def test_bad_settings_are_one_line_errors(command, values, needle):
    with pytest.raises(UserError) as e:
        get_command(command).build(values)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,needle", [
    ("atack gcg", "'atack' is not a suffix-analysis command (did you mean 'attack'?)"),
    ("attack", "needs one attack name"),
    ("organism", "needs a subcommand, e.g. 'organism build'"),
    ("attack nope", "unknown attack 'nope'"),
])
def test_unknown_commands_name_the_nearest(name, needle):
    with pytest.raises(UserError) as e:
        get_command(name)
    assert needle in str(e.value)
