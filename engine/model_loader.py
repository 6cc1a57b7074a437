"""Load a local Hugging Face model directory through transformers' own Auto classes.

Supported: the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) and plain causal LMs (Qwen2, Llama,
...). Works without torchvision: the tokenizer and the image processor are loaded
separately (``AutoProcessor`` would pull in the video processor, which needs it). Every
failure becomes one ``ModelLoadError`` line, never a traceback for the user.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError
from engine.model_adapter import VL_MODEL_TYPES, CausalLMAdapter, adapter_for
from engine.model_card import ModelCard

__all__ = ["LoadedModel", "ModelCard", "ModelLoadError", "load_image_processor", "load_model", "load_model_card"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNSUPPORTED_VL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "llava", "llava_next", "idefics3", "gemma3", "mllama")


@dataclass
class LoadedModel(ModelCard):
    """A ``ModelCard`` with the model built, its weights on ``device``: what the engine runs
    (through ``adapter``), with the image processor (``None`` for a text model). Its
    ``device`` and ``dtype`` are torch's objects (a card's are their names)."""

    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    adapter: CausalLMAdapter
    image_processor: Any | None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, bfloat16, float16 or float32")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {name!r}; choose cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from None


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    max_model_len: int | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> LoadedModel:
    """Load model, tokenizer and (for VL models) image processor; raise ``ModelLoadError``.
    ``progress(stage)`` is called as each stage starts: ``"tokenizer"``, ``"processor"``
    (VL models), ``"weights"``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    started = time.perf_counter()
    path, model_type, torch_device, torch_dtype = _checked(path, device, dtype)
    auto_class = AutoModelForImageTextToText if model_type in VL_MODEL_TYPES else AutoModelForCausalLM
    with _load_errors(path):
        tokenizer, image_processor = load_processors(path, images=model_type in VL_MODEL_TYPES, progress=progress)
        progress("weights")
        model = auto_class.from_pretrained(path, dtype=torch_dtype)
    _check_chat_template(path, model_type, tokenizer)
    adapter = adapter_for(model)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    supports_images = adapter.supports_images and image_processor is not None
    return LoadedModel(
        path=path,
        tokenizer=tokenizer,
        supports_images=supports_images,
        spatial_merge_size=getattr(adapter, "spatial_merge_size", None) if supports_images else None,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=_eos_ids(model.generation_config, tokenizer),
        max_model_len=_context_limit(model.config, max_model_len),
        load_seconds=time.perf_counter() - started,
        model=model,
        adapter=adapter,
        image_processor=image_processor,
    )


def load_model_card(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    max_model_len: int | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> ModelCard:
    """What ``load_model`` would give a front end (``ModelCard``), from the directory's
    config, generation config and tokenizer alone: no weight is read, no model built, and
    neither transformers' modelling code nor its image processing is imported (they bring
    torch's compiler stack and sympy: ~80 MiB and seconds of start-up, in a process that
    never runs the model). Raises ``ModelLoadError`` as ``load_model`` does for a
    directory it cannot serve; ``progress``: its ``"tokenizer"`` stage."""
    from transformers import AutoConfig, GenerationConfig

    started = time.perf_counter()
    path, model_type, torch_device, torch_dtype = _checked(path, device, dtype)
    images = model_type in VL_MODEL_TYPES
    with _load_errors(path):
        tokenizer, _ = load_processors(path, images=False, progress=progress)
        config = AutoConfig.from_pretrained(path)
        if (path / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(path)
        else:
            generation = GenerationConfig.from_model_config(config)
        if images and not (path / "preprocessor_config.json").is_file():
            raise OSError(f"{path} has no preprocessor_config.json for its image processor")
    _check_chat_template(path, model_type, tokenizer)
    return ModelCard(
        path=path,
        tokenizer=tokenizer,
        supports_images=images,
        spatial_merge_size=int(config.vision_config.spatial_merge_size) if images else None,
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        eos_token_ids=_eos_ids(generation, tokenizer),
        max_model_len=_context_limit(config, max_model_len),
        load_seconds=time.perf_counter() - started,
    )


def _checked(path: str | Path, device: str, dtype: str) -> tuple[Path, str, torch.device, torch.dtype]:
    """The directory, its model type, device and dtype, once checked that vlserve serves
    them (``ModelLoadError`` otherwise)."""
    path = Path(path).expanduser()
    raw = _read_config(path)
    model_type = raw.get("model_type", "")
    architectures = raw.get("architectures") or []
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if model_type in UNSUPPORTED_VL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported yet (supported VL: {', '.join(VL_MODEL_TYPES)})"
        )
    if model_type not in VL_MODEL_TYPES and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ModelLoadError(
            f"unsupported architecture {architectures or model_type!r}: vlserve serves Qwen2-VL/Qwen2.5-VL and causal LMs"
        )
    return path, model_type, torch_device, torch_dtype


@contextmanager
def _load_errors(path: Path) -> Iterator[None]:
    """What transformers raises while reading ``path`` becomes one ``ModelLoadError`` line."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {str(path)!r}: {first_line}") from None


def _check_chat_template(path: Path, model_type: str, tokenizer: Any) -> None:
    if model_type in VL_MODEL_TYPES and getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"{str(path)!r} has no chat template")


def _context_limit(config: Any, max_model_len: int | None) -> int:
    """``max_model_len`` if given, never more than the language model's position limit."""
    text_config = config.get_text_config()
    limit = max_model_len or getattr(text_config, "max_position_embeddings", 4096)
    return int(min(limit, getattr(text_config, "max_position_embeddings", limit)))


def load_processors(
    path: str | Path, *, images: bool, progress: Callable[[str], None] = lambda stage: None
) -> tuple[Any, Any | None]:
    """The model directory's tokenizer and, with ``images``, its image processor (loaded
    with ``AutoImageProcessor``, so no torchvision is needed). Everything that tokenizes
    or preprocesses for a model loads them here, so all copies are configured alike.
    ``progress``: as ``load_model``'s."""
    from transformers import AutoTokenizer

    progress("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = None
    if images:
        progress("processor")
        image_processor = load_image_processor(path)
    return tokenizer, image_processor


def load_image_processor(path: str | Path) -> Any:
    """The model directory's image processor, loaded with ``AutoImageProcessor`` (no
    torchvision needed); ``ModelLoadError`` if it cannot be."""
    # imported only here: transformers' image-processing modules import torch's compiler
    # stack (~78 MiB, ~3 s), which a process that only tokenizes never needs
    from transformers import AutoImageProcessor

    with _load_errors(Path(path)):
        return AutoImageProcessor.from_pretrained(path)


def _eos_ids(generation_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
