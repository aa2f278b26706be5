"""Typed configs: YAML round trip, dotted overrides, unknown keys named."""

import dataclasses

import pytest

from viq.config import PRESETS, TokenizerConfig, preset
from viq.configio import ConfigError, apply_overrides, dump_yaml, from_dict, load_config, to_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_yaml(name, tmp_path):
    cfg = preset(name)
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(TokenizerConfig, tmp_path / "c.yaml") == cfg


def test_preset_shapes():
    g = preset("g")
    assert (g.encoder.width, g.encoder.depth, g.encoder.num_heads, g.encoder.mlp_hidden) == (1536, 40, 16, 6144)
    s = preset("so400m")
    assert (s.encoder.width, s.encoder.depth, s.encoder.mlp_hidden) == (1152, 27, 4304)
    assert s.head.post_hidden == 2 * 1152 and g.head.rope_dim == 256


def test_dotted_overrides_are_typed(tmp_path):
    dump_yaml(preset("debug"), tmp_path / "c.yaml")
    cfg = load_config(TokenizerConfig, tmp_path / "c.yaml",
                      ["head.levels=[8,8,8,5,5,5]", "encoder.depth=3", "preprocess.area=4096", "name=x"])
    assert cfg.head.levels == (8, 8, 8, 5, 5, 5) and cfg.encoder.depth == 3
    assert cfg.preprocess.area == 4096 and cfg.name == "x"


def test_unknown_key_is_named(tmp_path):
    data = to_dict(preset("debug"))
    with pytest.raises(ConfigError, match="encoder.widht"):
        from_dict(TokenizerConfig, apply_overrides(data, ["encoder.widht=3"]))


def test_wrong_types_and_values_are_named():
    data = to_dict(preset("debug"))
    with pytest.raises(ConfigError, match="encoder.depth"):
        from_dict(TokenizerConfig, apply_overrides(data, ["encoder.depth=deep"]))
    with pytest.raises(ConfigError, match="head.quantizer"):
        from_dict(TokenizerConfig, apply_overrides(data, ["head.quantizer=vq"]))
    with pytest.raises(ValueError, match="level"):
        from_dict(TokenizerConfig, apply_overrides(data, ["head.levels=[1,8]"]))
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(data, ["encoder.depth"])


def test_width_mismatch_is_rejected():
    cfg = preset("debug")
    with pytest.raises(ValueError, match="head.width"):
        dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, width=32, num_heads=4))
