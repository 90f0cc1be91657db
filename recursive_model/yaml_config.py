"""Config files, one mechanism: the YAML loader and the pydantic conventions of every YAML-facing config.

Pipelines (`PipelineConfig`), sweeps (`SweepSpec`) and serving (`ServeConfig`) are pydantic models built from YAML
mappings through the functions here, so they share the same rules:
- `read_yaml_mapping(path)`: a missing file, invalid YAML or a top level that is not a mapping is a `ConfigError`
  naming the file;
- `StrictModel`: unknown keys are errors and values are not coerced (`steps: "5"` or `use_gpu: 1` are refused);
- `build(cls, data)`: a `ConfigError` with one clause per bad field, each naming the field path (`stages[1].lr`), the
  value and what is allowed;
- `DataclassField(cls)`: a frozen dataclass of a pydantic-free package (`RecurrenceSampling`, `ExitRule`,
  `StorageConfig`) as a field, built strictly from a mapping and dumped back as one.

Nothing in recursive_model imports this module: the model runs without pydantic.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, ValidationError

T = typing.TypeVar("T", bound=BaseModel)
_VALIDATOR_PREFIX = re.compile(r"^(Value error|Assertion failed), ")  # what pydantic puts before a validator's text


class ConfigError(ValueError):
    """A config value is invalid; the message names the field path, the value and what is allowed."""


class StrictModel(BaseModel):
    """Base of every YAML-facing config: a typo in a key fails loudly; types are checked, not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: what YAML, JSON and config hashes hold, and what `build` reads back."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> Any:
        """A validated copy with `changes` applied (what dataclasses.replace is for a dataclass)."""
        return build(type(self), {**self.to_dict(), **changes})


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is {}); ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def build(cls: type[T], data: Any, prefix: str = "", context: dict[str, Any] | None = None) -> T:
    """`cls.model_validate(data)`, with a ValidationError turned into a ConfigError naming each field path.
    `context` reaches the validators (`info.context`), e.g. the directory a YAML file's relative paths start from."""
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, root=cls)) from None


def format_validation_error(exc: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """One clause per error, each naming the field path: `stages[1].lr=20.0 is invalid: Input should be less than
    10`; `tiers[0].kv_cache: kv_cache='lru' is not a KV cache strategy ...`. `root` (the validated model) lets an
    unknown key list the known ones."""
    clauses = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        path = prefix + loc_to_path(loc) or "<root>"
        kind, msg = err.get("type", ""), err.get("msg", "")
        if kind == "extra_forbidden":
            known = _known_fields(root, loc[:-1]) if root is not None else None
            clauses.append(f"{path}: unknown field" + (f"; known: {known}" if known else ""))
        elif kind in ("value_error", "assertion_error"):
            # Our validators write the whole message (naming the value and the allowed range): keep it as it is;
            # a whole-model check (empty loc) names its fields itself.
            text = _VALIDATOR_PREFIX.sub("", msg)
            clauses.append(f"{path}: {text}" if loc or prefix else text)
        elif kind == "missing":
            clauses.append(f"{path}: required field is missing")
        else:
            clauses.append(f"{path}={err.get('input')!r} is invalid: {msg}")
    return "; ".join(clauses)


def loc_to_path(loc: tuple[Any, ...]) -> str:
    """('stages', 1, 'lr') -> 'stages[1].lr'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_fields(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the model found at `loc` below `root` (None when the walk leaves pydantic models)."""
    tp: Any = root
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = _strip_optional(tp.model_fields[part].annotation)
        else:
            return None
    return sorted(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _strip_optional(tp: Any) -> Any:
    """X | None -> X; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


# ------------------------------------------------------------------------------------- dataclasses as fields
def DataclassField(  # capitalised: it is used as a type, `recurrence: DataclassField(RecurrenceSampling) | None`
    cls: type,
    parse: Callable[[str], Any] | None = None,
    dump: Callable[[Any], Any] | None = None,
) -> Any:
    """An annotation for a field holding the frozen dataclass `cls`.

    Input: an instance, a mapping of its fields (unknown keys are an error naming them; `__post_init__`'s ValueError
    becomes this field's error), or with `parse` a string (e.g. ExitRule's 'kl:5e-4'). Output (model_dump, YAML): a
    dict of its fields, or `dump(value)`.
    """
    names = [f.name for f in dataclasses.fields(cls)]

    def validate(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and parse is not None:
            return parse(value)
        if not isinstance(value, dict):
            forms = "a mapping of its fields" + (" or a string" if parse else "")
            raise ValueError(f"{value!r} is not a {cls.__name__}; give {forms} ({', '.join(names)})")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {names}")
        return cls(**value)

    return Annotated[cls, PlainValidator(validate), PlainSerializer(dump or dataclasses.asdict)]
