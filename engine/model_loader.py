"""Load a local Hugging Face model directory through transformers' own Auto classes.

Supported: the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) and plain causal LMs (Qwen2, Llama,
...). Works without torchvision: the tokenizer and the image processor are loaded
separately (``AutoProcessor`` would pull in the video processor, which needs it). Every
failure becomes one ``ModelLoadError`` line, never a traceback for the user.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError
from engine.model_adapter import VL_MODEL_TYPES, CausalLMAdapter, adapter_for

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNSUPPORTED_VL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "llava", "llava_next", "idefics3", "gemma3", "mllama")


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module
    adapter: CausalLMAdapter
    tokenizer: Any
    image_processor: Any | None
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_model_len: int
    load_seconds: float

    @property
    def supports_images(self) -> bool:
        return self.adapter.supports_images and self.image_processor is not None


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
    weights: bool = True,
    progress: Callable[[str], None] = lambda stage: None,
) -> LoadedModel:
    """Load model, tokenizer and (for VL models) image processor; raise ``ModelLoadError``.
    ``progress(stage)`` is called as each stage starts: ``"tokenizer"``, ``"processor"``
    (VL models), ``"weights"`` (unless ``weights=False``).

    With ``weights=False`` no weight is read: the model is built on the meta device from
    its config, so its config, adapter settings, limits, tokenizer and image processor are
    there but no forward can run: what a front end needs while the engine (vision encoder
    included) runs in its own process."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    started = time.perf_counter()
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
    if model_type in VL_MODEL_TYPES:
        auto_class = AutoModelForImageTextToText
    elif any(a.endswith("ForCausalLM") for a in architectures):
        auto_class = AutoModelForCausalLM
    else:
        raise ModelLoadError(
            f"unsupported architecture {architectures or model_type!r}: vlserve serves Qwen2-VL/Qwen2.5-VL and causal LMs"
        )
    try:
        tokenizer, image_processor = load_processors(path, images=model_type in VL_MODEL_TYPES, progress=progress)
        if weights:
            progress("weights")
            model = auto_class.from_pretrained(path, dtype=torch_dtype)
        else:
            with torch.device("meta"):
                model = auto_class.from_config(AutoConfig.from_pretrained(path), dtype=torch_dtype)
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {str(path)!r}: {first_line}") from None
    if model_type in VL_MODEL_TYPES and getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"{str(path)!r} has no chat template")
    adapter = adapter_for(model)
    eos_token_ids = _eos_ids(model, tokenizer)
    if weights:
        model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    text_config = model.config.get_text_config()
    limit = max_model_len or getattr(text_config, "max_position_embeddings", 4096)
    limit = min(limit, getattr(text_config, "max_position_embeddings", limit))
    return LoadedModel(
        path=path,
        model=model,
        adapter=adapter,
        tokenizer=tokenizer,
        image_processor=image_processor,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids,
        max_model_len=int(limit),
        load_seconds=time.perf_counter() - started,
    )


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
        # imported only here: transformers' image-processing modules import torch's compiler
        # stack (~78 MiB, ~3 s), which a process that only tokenizes never needs
        from transformers import AutoImageProcessor

        progress("processor")
        image_processor = AutoImageProcessor.from_pretrained(path)
    return tokenizer, image_processor


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
