"""``ServerConfig`` fields as CLI flags and ``VLSERVE_*`` environment variables.

The table is derived from the dataclass, so a new config field gets a flag and a variable
without further code: ``max_body_bytes`` is ``--max-body-bytes`` / ``VLSERVE_MAX_BODY_BYTES``.
``api_keys`` is the repeatable ``--api-key`` / ``VLSERVE_API_KEY``. List-valued options
take a comma-separated list in the environment, and repeat (or commas) on the command
line. Precedence: flag, then environment, then the dataclass default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from server.config import ServerConfig

ENV_PREFIX = "VLSERVE_"
SKIPPED_FIELDS = frozenset({"extra"})
RENAMED_FIELDS = MappingProxyType({"api_keys": "api_key"})

HELP = MappingProxyType(
    {
        "model": "local Hugging Face model directory (default: the built-in tiny model)",
        "served_model_name": "model id clients send in 'model' (default: the directory's name)",
        "api_keys": "accepted Bearer key; repeat for several (default: no auth)",
        "cors_allow_origins": "origins allowed by CORS, '*' for any (default: no CORS)",
        "max_body_bytes": "largest accepted request body in bytes (413 beyond)",
        "max_concurrent_requests": "requests in flight before refusing with 503",
        "engine_process": "run the engine (scheduler, model, sampler) in its own worker process",
        "engine_torch_threads": "torch threads in the engine worker process (0: CPUs minus one, at least one)",
        "engine_nice": "niceness added to the engine worker process (CPU priority below the server's)",
        "prep_processes": "run template, tokenizer and image prep in worker processes instead of threads",
        "prep_nice": "niceness added to each prep worker process",
        "drain_timeout": "seconds in-flight requests get to finish on SIGINT/SIGTERM",
    }
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """An option value that cannot be used; the message names the flag or variable."""


@dataclass(frozen=True)
class Option:
    field: str
    kind: type  # str, int, float, bool or tuple (of str)
    optional: bool
    default: Any

    @property
    def name(self) -> str:
        return RENAMED_FIELDS.get(self.field, self.field)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def help(self) -> str:
        return HELP.get(self.field, self.field.replace("_", " "))


def _option(field: dataclasses.Field[Any], hint: Any) -> Option:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        kind: type = tuple
    elif optional and len(args) == 1:
        kind = args[0]
    else:
        kind = hint
    if kind not in (str, int, float, bool, tuple):
        raise TypeError(f"ServerConfig.{field.name}: no option type for {hint!r}")
    return Option(field.name, kind, optional, field.default)


def config_options() -> list[Option]:
    """One ``Option`` per ``ServerConfig`` field (except ``extra``)."""
    hints = typing.get_type_hints(ServerConfig)
    return [
        _option(field, hints[field.name])
        for field in dataclasses.fields(ServerConfig)
        if field.name not in SKIPPED_FIELDS
    ]


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
    """The config fields set by ``VLSERVE_*`` variables in ``environ``."""
    return {
        option.field: convert(option, environ[option.env], option.env)
        for option in config_options()
        if option.env in environ
    }


def config_from_env(environ: Mapping[str, str], **overrides: Any) -> ServerConfig:
    """A ``ServerConfig`` from the environment, then ``overrides``. Raises ``ConfigError``."""
    return ServerConfig(**{**values_from_env(environ), **overrides})
