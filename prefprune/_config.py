"""Settings dataclasses from YAML files and mappings: unknown keys with file and line, typed values.

The settings of every stage are plain dataclasses whose fields carry help text and `Literal` choices;
`tyro` turns them into the command line (`prefprune.cli`) and pydantic checks and converts the values a
YAML file or a Python mapping gives them (nested mappings become nested dataclasses). On top of the two
libraries this module only adds what they cannot know: the YAML line of an unknown key, the shape rule
of sections that the command line shows without a prefix, and messages in the project's words
(``seeds must be a list, got 'three'``).

The library never imports `tyro` (nor pydantic, until a mapping is converted): a field's command-line
options are written ``Annotated[T, cli_arg(...)]``, evaluated lazily (the modules use postponed
annotations), and `cli_arg` gives tyro's own marker once the CLI has imported tyro.

A field annotated ``Annotated[SomeConfig, cli_arg(name="")]`` is *flattened*: its sub-fields are
flags without a prefix (``--model``, ``--dtype``) and, to keep the YAML file and the flags the same
shape, YAML keys of the parent mapping as well (``model: minilm`` next to ``seeds: [0]``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["cli_arg", "flattened_fields", "from_mapping", "read_yaml", "section_fields"]

T = TypeVar("T")

# pydantic error type -> the project's wording (the value is appended as ", got <value>").
_KINDS = {
    "list_type": "must be a list",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping of settings",
    "dataclass_type": "must be a mapping of settings",
    "none_required": "must be null",
}


@dataclasses.dataclass(frozen=True)
class CliArg:
    """A field's command-line options (tyro's ``conf.arg`` fields) while tyro is not loaded."""

    name: str | None = None
    aliases: tuple[str, ...] | None = None


def cli_arg(*, name: str | None = None, aliases: tuple[str, ...] | None = None) -> Any:
    """Command-line options of a settings field, for ``Annotated[T, cli_arg(...)]``.

    Only the CLI reads these, through tyro, which evaluates the postponed annotations after `prefprune.cli`
    has imported it: then this returns ``tyro.conf.arg(...)``. Anywhere else (the library, YAML reading,
    an environment without tyro) it returns a `CliArg` with the same fields, which nothing but
    `flattened_fields` reads.
    """
    tyro = sys.modules.get("tyro")
    if tyro is None:
        return CliArg(name=name, aliases=aliases)
    return tyro.conf.arg(name=name, aliases=aliases)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _is_flattened(hint: Any) -> bool:
    """Whether a field hint is ``Annotated[..., cli_arg(name="")]`` (a section shown unprefixed)."""
    if typing.get_origin(hint) is not typing.Annotated:
        return False
    return any(getattr(m, "name", None) == "" for m in hint.__metadata__)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field hint holds (through Annotated and ``X | None``), else None."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def flattened_fields(cls: type) -> dict[str, str]:
    """Sub-field name → name of the flattened section of `cls` that owns it."""
    out: dict[str, str] = {}
    for name, hint in _hints(cls).items():
        sub = _dataclass_of(hint)
        if sub is not None and _is_flattened(hint):
            for f in dataclasses.fields(sub):
                out[f.name] = name
    return out


def section_fields(cls: type) -> list[str]:
    """The keys a mapping for `cls` may hold: its own fields, flattened sections replaced by theirs."""
    flat = flattened_fields(cls)
    sections = set(flat.values())
    return [f.name for f in dataclasses.fields(cls) if f.name not in sections] + list(flat)


def _nest(cls: type, values: Mapping[str, Any], where: str, lines: Mapping[tuple, int], path: tuple) -> dict:
    """Check the keys of `values` against `cls` (recursively) and move flattened keys into their section."""
    flat = flattened_fields(cls)
    hints = _hints(cls)
    known = set(section_fields(cls))
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            line = lines.get((*path, key))
            at = f"{where}{f', line {line}' if line else ''}: " if where else ""
            if path:
                dotted = ".".join(map(str, (*path, key)))
                raise ValueError(f"{at}unknown key {dotted}; known: {sorted(section_fields(cls))}")
            raise ValueError(f"{at}unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        owner = flat.get(key)
        if owner is not None:
            target, hint_owner = out.setdefault(owner, {}), _dataclass_of(hints[owner])
            target[key] = _nested_value(hint_owner, key, value, where, lines, path)
        else:
            out[key] = _nested_value(cls, key, value, where, lines, path)
    return out


def _nested_value(
    cls: type, key: str, value: Any, where: str, lines: Mapping[tuple, int], path: tuple
) -> Any:
    sub = _dataclass_of(_hints(cls)[key])
    if sub is not None and isinstance(value, Mapping):
        return _nest(sub, value, where, lines, (*path, key))
    return value


def _message(err: Mapping[str, Any]) -> str:
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    if err["type"] == "literal_error":
        return f"{loc} must be one of {err['ctx']['expected']}, got {err['input']!r}"
    kind = _KINDS.get(err["type"])
    if kind is None:
        return f"{loc}: {err['msg']}, got {err['input']!r}"
    return f"{loc} {kind}, got {err['input']!r}"


def _admits(hint: Any) -> tuple[set[type], Any]:
    """(the scalar types a field hint admits, the item hint when it is a list), through Annotated/unions."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    origin = typing.get_origin(hint)
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(hint)
        return {list}, args[0] if args else Any
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        item = None
        for arg in typing.get_args(hint):
            k, i = _admits(arg)
            kinds |= k
            item = item if i is None else i
        return kinds, item
    return ({hint} if isinstance(hint, type) else set()), None


def _reject_bools(cls: type, values: Mapping[str, Any], where: str, lines: Mapping[tuple, int],
                  yaml_path: tuple) -> None:
    """A YAML ``true`` given for a number is an error (pydantic would take it as 1): name key and line.

    `values` is nested as `cls` is (flattened sections as sub-mappings); `yaml_path` is where `values` sits
    in the file, whose keys are the flags' shape (a flattened section's keys at its parent's level)."""
    hints, flat = _hints(cls), flattened_fields(cls)
    for key, value in values.items():
        if key not in hints:
            continue
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, Mapping):
            inner = yaml_path if key in set(flat.values()) else (*yaml_path, key)
            _reject_bools(sub, value, where, lines, inner)
            continue
        kinds, item = _admits(hints[key])
        checks = [(f"{key}", value, kinds)]
        if isinstance(value, list) and item is not None:
            item_kinds = _admits(item)[0]
            checks = [(f"{key}[{i}]", v, item_kinds) for i, v in enumerate(value)]
        for name, v, admitted in checks:
            if isinstance(v, bool) and bool not in admitted and admitted & {int, float}:
                line = lines.get((*yaml_path, key))
                at = f"{where}{f', line {line}' if line else ''}: " if where else ""
                want = "an integer" if int in admitted else "a number"
                dotted = ".".join(map(str, (*yaml_path, name)))
                raise ValueError(f"{at}{dotted} must be {want}, got {v!r} (a YAML boolean)")


def from_mapping(
    cls: type[T],
    values: Mapping[str, Any],
    *,
    where: str = "",
    lines: Mapping[tuple, int] | None = None,
    section: str | None = None,
) -> T:
    """A `cls` instance from a (possibly nested) mapping; ValueError naming the key, the value and `where`.

    Args:
        cls: a settings dataclass.
        values: field → value; a dataclass field may be given as a mapping of its own fields.
        where: prefix of error messages (a file name).
        lines: (key, sub-key, ...) → line in the file, for unknown-key messages.
        section: the name `values` has inside a larger config (prefixes the keys in messages).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where + ': ' if where else ''}settings must be a mapping, got {values!r}")
    path = (section,) if section else ()
    nested = _nest(cls, values, where, lines or {}, path)
    _reject_bools(cls, nested, where, lines or {}, path)
    from pydantic import TypeAdapter, ValidationError  # lazy: only settings from mappings need it

    try:
        return TypeAdapter(cls).validate_python(nested)
    except ValidationError as exc:
        first = dict(exc.errors(include_url=False)[0])
        first["loc"] = (*path, *first["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{_message(first)}") from None


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML 1.2 forbids it;
    PyYAML keeps the last value without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                continue
            if first is not None:
                raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first on line {first}); "
                                    "keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple, int]]:
    """(mapping, key path → 1-based line) of a YAML file; ValueError naming the file and line when it is not
    UTF-8, not YAML, holds a key twice, or holds no settings at all."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{p}: line {line}, column {column}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as "
            "UTF-8"
        ) from None
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ValueError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: invalid YAML: {exc}") from None
    if loaded is None or loaded == {}:
        raise ValueError(
            f"{p}: the config file holds no settings; give at least one (e.g. 'output: runs/my-experiment'), "
            "or leave out --config to run with the defaults"
        )
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{p}: the config must be a mapping of keys to values, got {type(loaded).__name__}")
    lines: dict[tuple, int] = {}

    def walk(n: Any, prefix: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = (*prefix, k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    walk(node, ())
    return dict(loaded), lines
