"""The sampling defaults a model ships in its ``generation_config.json``, applied to the
fields a request leaves unset (vLLM's ``--generation-config auto``).

``--generation-config`` takes ``auto`` (the model directory's file, the default),
``vllm`` (no model defaults: the neutral values of ``server.sampling``) or a directory
holding a ``generation_config.json``. As in vLLM, only the sampling keys are read
(``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, and
``max_new_tokens`` as the default ``max_tokens``); ``do_sample`` is ignored. A value of
the wrong type or out of range is skipped with a warning, so a model's file can never
make every request fail.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger("vlserve.sampling_defaults")

AUTO = "auto"
NONE = "vllm"
FILE_NAME = "generation_config.json"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# generation_config.json key -> (SamplingDefaults field, valid value)
KEYS: Mapping[str, tuple[str, Callable[[Any], bool]]] = {
    "temperature": ("temperature", lambda v: _number(v) and 0 <= v <= 2),
    "top_p": ("top_p", lambda v: _number(v) and 0 < v <= 1),
    "top_k": ("top_k", _integer),
    "min_p": ("min_p", lambda v: _number(v) and 0 <= v <= 1),
    "repetition_penalty": ("repetition_penalty", lambda v: _number(v) and v > 0),
    "max_new_tokens": ("max_tokens", lambda v: _integer(v) and v >= 1),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """Values for request fields left unset; ``None``: no model default (the request's
    own default applies). ``max_tokens`` caps the completion when a request gives no length."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The defaults that are set, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


NO_DEFAULTS = SamplingDefaults()


def defaults_from(config: Mapping[str, Any]) -> SamplingDefaults:
    """The sampling defaults of a parsed ``generation_config.json`` (invalid values skipped)."""
    values: dict[str, Any] = {}
    for key, (name, valid) in KEYS.items():
        if key not in config or config[key] is None:
            continue
        if valid(config[key]):
            values[name] = config[key]
        else:
            logger.warning("ignoring %s=%r in %s: not a valid default", key, config[key], FILE_NAME)
    return SamplingDefaults(**values)


def read_sampling_defaults(setting: str, model_dir: str | Path) -> SamplingDefaults:
    """The defaults ``--generation-config setting`` asks for, for the model in ``model_dir``.

    Raises ``ValueError`` if ``setting`` names a directory without a readable file; a
    model directory without one (``auto``) just has no defaults. Blocking (reads a file).
    """
    if setting == NONE:
        return SamplingDefaults()
    explicit = setting != AUTO
    path = Path(setting if explicit else model_dir) / FILE_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise ValueError(f"--generation-config {setting}: no {FILE_NAME} there") from None
        return SamplingDefaults()
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    defaults = defaults_from(config)
    if defaults.as_dict():
        logger.info("sampling defaults from %s: %s", path, defaults.as_dict())
    return defaults
