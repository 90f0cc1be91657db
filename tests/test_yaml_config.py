"""One config mechanism: the shared YAML loader, strict pydantic models, errors naming the field path, and frozen
dataclasses as fields; pipelines, sweeps and serving all load their YAML through it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import Field

from pipelines.config import PipelineConfig
from pipelines.sweep import SweepSpec
from recursive_model.recurrence import ExitRule
from recursive_model.yaml_config import ConfigError, DataclassField, StrictModel, build, read_yaml_mapping
from serve.config import load_config


@dataclass(frozen=True, kw_only=True)
class Point:
    x: int = 0
    y: int = 0

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError(f"Point.x={self.x} is invalid; allowed >= 0")


class Leaf(StrictModel):
    n: int = Field(1, ge=1)
    rate: float = 0.5


class Root(StrictModel):
    leaves: list[Leaf] = Field(default_factory=list)
    point: DataclassField(Point) = Field(default_factory=Point)
    rule: DataclassField(ExitRule, parse=ExitRule.parse, dump=str) | None = None


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "the top level must be a mapping of fields, got list"),
    ],
)
def test_every_loader_reads_yaml_the_same_way(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for load in (read_yaml_mapping, PipelineConfig.from_yaml, SweepSpec.from_yaml, load_config):
        with pytest.raises(ValueError, match=message) as info:
            load(path)
        assert str(path) in str(info.value), load
    assert read_yaml_mapping(_write(tmp_path, "empty.yaml", "")) == {}
    with pytest.raises(ConfigError, match=r"sweep file .*nope.yaml does not exist"):
        SweepSpec.from_yaml(tmp_path / "nope.yaml")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ({"leaves": [{"n": 1}, {"n": 0}]}, r"^leaves\[1\].n=0 is invalid: Input should be greater than or equal to 1$"),
        ({"leaves": [{"m": 1}]}, r"^leaves\[0\].m: unknown field; known: \['n', 'rate'\]$"),
        ({"leaf": []}, r"^leaf: unknown field; known: \['leaves', 'point', 'rule'\]$"),
        ({"leaves": [{"n": "2"}]}, r"^leaves\[0\].n='2' is invalid: Input should be a valid integer$"),
        ({"leaves": [{"n": True}]}, r"^leaves\[0\].n=True is invalid"),  # strict: a bool is not an int
        ({"point": {"x": -1}}, r"^point: Point.x=-1 is invalid; allowed >= 0$"),
        ({"point": {"z": 1}}, r"^point: unknown Point field\(s\) \['z'\]; known: \['x', 'y'\]$"),
        ({"point": 3}, r"^point: 3 is not a Point; give a mapping of its fields \(x, y\)$"),
        ({"rule": "kl"}, r"^rule: exit rule 'kl' is not criterion:threshold"),
        ({"leaves": [{"n": 0}], "point": {"x": -1}}, r"^leaves\[0\].n=0 is invalid: .*; point: Point.x=-1"),
    ],
)
def test_errors_name_the_field_path_the_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        build(Root, data)


def test_dataclass_fields_round_trip_through_plain_data():
    root = build(Root, {"leaves": [{"rate": 1}], "point": {"x": 2}, "rule": "kl:5e-4:2"})
    assert root.point == Point(x=2) and root.rule == ExitRule(criterion="kl", threshold=5e-4, min_recur=2)
    assert root.leaves[0].rate == 1.0 and isinstance(root.leaves[0].rate, float)  # an int is a valid float
    data = root.to_dict()
    assert data == {"leaves": [{"n": 1, "rate": 1.0}], "point": {"x": 2, "y": 0}, "rule": "kl:0.0005:2"}
    assert build(Root, data) == root
    assert root.replace(point={"y": 5}).point == Point(y=5)
    with pytest.raises(ConfigError, match=r"^point: Point.x=-1"):
        root.replace(point={"x": -1})
