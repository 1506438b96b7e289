"""YAML -> frozen dataclasses, with errors that name the file, line and key.

* Unknown keys are errors with a did-you-mean hint; duplicate YAML keys are errors.
* Types are checked (int, float, str, bool, Optional, list, dict, Literal, nested
  dataclasses); ints are accepted where floats are expected, nothing else is coerced.
* Dotted command-line overrides: ``train.lr=3e-4 data.tasks=[wnut16,rotten_tomatoes]``;
  the value is parsed with ``yaml.safe_load`` (never ``eval``).
* A config file names its recipe with a top-level ``recipe:`` key; the recipe
  registry maps that name to the dataclass that validates it.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from scd import recipes
from scd.core.registry import did_you_mean, registry

RECIPES = registry("recipe")  # name -> RecipeSpec


class ConfigError(ValueError):
    """A one-line, user-facing configuration error (file:line: key: message)."""


# ----------------------------------------------------------------------------- YAML
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and records each key's line."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise ConfigError(f"{_where(loader.name, key_node.start_mark.line + 1)}duplicate key '{key}'")
        out[key] = loader.construct_object(value_node, deep=deep)
        loader._lines[id(out), key] = key_node.start_mark.line + 1  # type: ignore[attr-defined]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _where(path: str | None, line: int | None) -> str:
    if not path:
        return ""
    return f"{path}:{line}: " if line else f"{path}: "


@dataclasses.dataclass
class Source:
    """Where a mapping came from, to point errors at file:line."""

    path: str | None = None
    lines: dict | None = None  # (id(mapping), key) -> line

    def line(self, mapping: Any, key: str) -> int | None:
        if self.lines is None:
            return None
        return self.lines.get((id(mapping), key))


def load_yaml(path: str | os.PathLike) -> tuple[dict, Source]:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    loader = _LineLoader(text)
    loader.name = path
    loader._lines = {}  # type: ignore[attr-defined]
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"{_where(path, line)}invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data, Source(path, loader._lines)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.subkey=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None, inplace: bool = False) -> dict:
    """``data`` with dotted overrides applied (new keys are allowed here; validation
    against the dataclass rejects unknown ones afterwards).  ``inplace`` keeps the
    mappings' identities, so errors still point at the file's lines."""
    import copy

    if not inplace:
        data = copy.deepcopy(data)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


# ----------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType))


def _check(value: Any, tp: Any, key: str, err, root_err) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        blocks = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(blocks) == 1:  # an optional block: report what is wrong inside it
            return _check(value, blocks[0], key, err, root_err)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, err, root_err)
            except ConfigError as e:
                errors.append(str(e))
        raise err(key, f"expected {_type_name(tp)}, got {value!r}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise err(key, f"must be one of {list(choices)}, got {value!r}{did_you_mean(value, choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise err(key, f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _from_dict(tp, value, key, root_err, post_err=err)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise err(key, f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_check(v, inner, f"{key}[{i}]", err, root_err) for i, v in enumerate(value)]
        return tuple(items)  # frozen dataclasses hold tuples
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise err(key, f"expected a mapping, got {type(value).__name__}")
        args = get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _check(v, inner, f"{key}.{k}", err, root_err) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise err(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise err(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:  # YAML 1.1 reads "1e-4" as a string; accept plain numeric strings
                    return float(value)
                except ValueError:
                    pass
            raise err(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise err(key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise err(key, f"expected {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls: type, data: dict, prefix: str, err, post_err=None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise err(dotted, f"unknown key in {cls.__name__}{did_you_mean(key, fields)}",
                      mapping=data, raw_key=key)
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            def field_err(k: str, m: str, _name: str = name) -> ConfigError:
                return err(k, m, mapping=data, raw_key=_name)

            kwargs[name] = _check(data[name], hints[name], dotted, field_err, err)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise err(dotted, "required key is missing", mapping=None)
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks (contradictory options)
        if post_err is not None:  # points at the line of this block's key in the parent
            raise post_err(prefix, str(e)) from None
        raise err(prefix or None, str(e), mapping=None) from None
    return obj


def from_dict(cls: type, data: dict, source: Source | None = None) -> Any:
    """Validate ``data`` into dataclass ``cls``; errors name file:line: key."""
    source = source or Source()

    def err(key: str | None, msg: str, mapping: Any = None, raw_key: str | None = None, **_: Any) -> ConfigError:
        line = source.line(mapping, raw_key) if mapping is not None and raw_key is not None else None
        what = f"key '{key}': " if key else ""
        return ConfigError(f"{_where(source.path, line)}{what}{msg}")

    return _from_dict(cls, data, "", err)


def added_field(*, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field added after runs were recorded: :func:`to_dict` leaves it out while it holds its
    default, so the resolved config -- and the run_id hashed from it -- of every config that does not
    set it stays what it was (finished runs stay finished).  Use it for every field added to a recipe
    config that grids have already run."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"omit_if_default": True})


def _at_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return value == f.default_factory()  # type: ignore[misc]
    return False


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON/YAML-able dict (tuples become lists; :func:`added_field` fields at their
    default are left out)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_if_default") and _at_default(f, getattr(obj, f.name)))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    name: str
    config_cls: type
    run: typing.Callable | None = None  # run(cfg, run_dir) -> dict
    # resolved config -> the dict its run id is hashed from (scd.core.results.run_id); None: the config itself.
    # For parameters whose default changed after runs were recorded (unisd: components.*.template): the view
    # leaves out the value those runs behaved as, so a config that pins it keeps the recorded run id.
    id_view: typing.Callable | None = None


def register_recipe(name: str, config_cls: type, run: typing.Callable | None = None,
                    id_view: typing.Callable | None = None) -> RecipeSpec:
    spec = RecipeSpec(name, config_cls, run, id_view)
    RECIPES.add(name, spec, override=True)
    return spec


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                recipe: str | None = None) -> Any:
    """Load a config file into its recipe's dataclass (``recipe:`` key picks it)."""
    data, source = load_yaml(path)
    data = apply_overrides(data, overrides, inplace=True)
    name = recipe or data.get("recipe")
    known = sorted(set(RECIPES.names()) | set(recipes.BUILTIN))
    if name is None:
        raise ConfigError(f"{path}:1: missing top-level key 'recipe' (one of {known})")
    if isinstance(name, str):
        recipes.ensure(name)
    if name not in RECIPES:
        line = source.line(data, "recipe")
        raise ConfigError(f"{_where(str(path), line)}key 'recipe': unknown recipe '{name}'"
                          f"{did_you_mean(name, known)}; known: {', '.join(known)}")
    spec = RECIPES.get(name)
    return from_dict(spec.config_cls, data, source)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
