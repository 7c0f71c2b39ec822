import dataclasses
from typing import List, Literal, Optional

import pytest

from cluda.config import ConfigError, from_dict, load_config, parse_overrides, save_yaml, to_dict


@dataclasses.dataclass
class Inner:
    temperature: float = 1.0
    pairs: Literal["all", "stuff", "stuff+thing"] = "stuff+thing"
    feat_size: Optional[List[int]] = None


@dataclasses.dataclass
class Outer:
    name: str = "x"
    iters: int = 10
    enabled: bool = True
    cl: Inner = dataclasses.field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("iters: 5\ncl:\n  temperature: 0.5\n  feat_size: [65, 65]\n")
    cfg = load_config(Outer, str(p), ["--cl.temperature=0.1", "--name=run1", "--enabled=false"])
    assert cfg.iters == 5 and cfg.cl.temperature == 0.1 and cfg.name == "run1"
    assert cfg.enabled is False and cfg.cl.feat_size == [65, 65] and cfg.cl.pairs == "stuff+thing"
    # int given for a float field becomes a float; None via null
    cfg = load_config(Outer, str(p), ["--cl.temperature=1", "--cl.feat_size=null"])
    assert isinstance(cfg.cl.temperature, float) and cfg.cl.feat_size is None


def test_unknown_keys_list_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"cl\.temprature.*known keys of cl: temperature, pairs, feat_size"):
        from_dict(Outer, {"cl": {"temprature": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key 'cl.temprature'.*feat_size"):
        load_config(Outer, None, ["--cl.temprature=0.1"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(Outer, None, ["--nope=1"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(Outer, None, ["--iters.x=1"])


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"iters: expected an integer, got 'ten'"):
        load_config(Outer, None, ["--iters=ten"])
    with pytest.raises(ConfigError, match=r"cl\.pairs: expected one of"):
        load_config(Outer, None, ["--cl.pairs=things"])
    with pytest.raises(ConfigError, match=r"cl\.feat_size\[1\]: expected an integer"):
        from_dict(Outer, {"cl": {"feat_size": [65, "a"]}})
    with pytest.raises(ConfigError, match="enabled: expected true or false"):
        from_dict(Outer, {"enabled": 1})
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["cl.temperature=0.1"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(Outer, str(tmp_path / "missing.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, str(p))


def test_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["--cl.feat_size=[33, 17]", "--name=a b"])
    save_yaml(to_dict(cfg), str(tmp_path / "out.yaml"))
    again = load_config(Outer, str(tmp_path / "out.yaml"))
    assert again == cfg
    assert [f.name for f in tmp_path.iterdir()] == ["out.yaml"]
