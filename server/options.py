"""``ServerConfig`` fields as CLI flags and ``VLSERVE_*`` environment variables.

The table is derived from the dataclasses: every leaf field of ``ServerConfig`` and of the
configs nested in it (``engine``, ``prep``, ``media``) is one option, named after the field
(or its ``option`` metadata) without the nesting: ``max_body_bytes`` is
``--max-body-bytes`` / ``VLSERVE_MAX_BODY_BYTES``, ``engine.torch_threads`` is
``--engine-torch-threads``. Its help text is the field's ``help`` metadata. List-valued
options take a comma-separated list in the environment, and repeat (or commas) on the
command line. Precedence: flag, then environment, then the dataclass default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from server.config import ServerConfig

ENV_PREFIX = "VLSERVE_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """An option value that cannot be used; the message names the flag or variable."""


@dataclass(frozen=True)
class Option:
    """One leaf field of the configuration. ``path`` is its attribute path from
    ``ServerConfig`` (``("engine", "max_num_seqs")``), ``name`` its flat option name."""

    path: tuple[str, ...]
    name: str
    kind: type  # str, int, float, bool or tuple (of str)
    optional: bool
    default: Any
    help_text: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def help(self) -> str:
        if "default:" in self.help_text:
            return self.help_text
        default = ",".join(self.default) if self.kind is tuple else self.default
        return f"{self.help_text} (default: {default})"


def _option(owner: type, field: dataclasses.Field[Any], hint: Any, path: tuple[str, ...]) -> Option:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        kind: type = tuple
    elif optional and len(args) == 1:
        kind = args[0]
    else:
        kind = hint
    if kind not in (str, int, float, bool, tuple):
        raise TypeError(f"{owner.__name__}.{field.name}: no option type for {hint!r}")
    name = field.metadata.get("option", field.name)
    return Option(
        path,
        name,
        kind,
        optional,
        field.default,
        field.metadata.get("help", name.replace("_", " ")),
    )


def _options_of(cls: type, prefix: tuple[str, ...]) -> list[Option]:
    hints = typing.get_type_hints(cls)
    options = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            options.extend(_options_of(hint, (*prefix, field.name)))
        else:
            options.append(_option(cls, field, hint, (*prefix, field.name)))
    return options


@cache
def _all_options() -> tuple[Option, ...]:
    options = tuple(_options_of(ServerConfig, ()))
    names = [option.name for option in options]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise TypeError(f"config fields share option names: {sorted(duplicates)}")
    return options


def config_options() -> list[Option]:
    """One ``Option`` per leaf field of ``ServerConfig`` and the configs nested in it."""
    return list(_all_options())


def split_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def convert(option: Option, raw: str, source: str) -> Any:
    """``raw`` (from ``source``, a flag or variable name) as the option's type."""
    if option.kind is tuple:
        return split_list(raw)
    if option.kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"{source}: expected true or false, got {raw!r}")
    if option.optional and raw == "":
        return None
    try:
        return option.kind(raw)
    except ValueError:
        raise ConfigError(f"{source}: expected {option.kind.__name__}, got {raw!r}") from None


def values_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The options set by ``VLSERVE_*`` variables in ``environ``, by option name."""
    return {
        option.name: convert(option, environ[option.env], option.env)
        for option in config_options()
        if option.env in environ
    }


def build_config(values: Mapping[str, Any]) -> ServerConfig:
    """A ``ServerConfig`` with the given options (by flat option name, e.g.
    ``max_num_seqs``) and defaults elsewhere. Raises ``ConfigError`` for an unknown name or
    a value a config class rejects."""
    by_name = {option.name: option for option in config_options()}
    unknown = set(values) - set(by_name)
    if unknown:
        raise ConfigError(f"unknown options: {', '.join(sorted(unknown))}")
    nested: dict[str, Any] = {}
    for name, value in values.items():
        *parents, leaf = by_name[name].path
        level = nested
        for parent in parents:
            level = level.setdefault(parent, {})
        level[leaf] = value
    try:
        return _build(ServerConfig, nested)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _build(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {name: _build(hints[name], value) if isinstance(value, dict) else value for name, value in values.items()}
    return cls(**kwargs)


def config_from_env(environ: Mapping[str, str], **overrides: Any) -> ServerConfig:
    """A ``ServerConfig`` from the environment, then ``overrides`` (by option name).
    Raises ``ConfigError``."""
    return build_config({**values_from_env(environ), **overrides})
