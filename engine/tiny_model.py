"""Build vlserve's built-in tiny Qwen2-VL model: a real, randomly initialised HF directory.

The directory holds a ``Qwen2VLForConditionalGeneration`` (a real vision tower, M-RoPE,
variable image-token counts), a byte-level BPE tokenizer trained offline on a fixed
corpus, a Qwen-style chat template that accepts OpenAI content parts, and an
image-processor config whose ``max_pixels`` suits a CPU (``TINY_IMAGE_LIMITS``: at most 256
image tokens per image). ``QWEN2_VL_DEFAULT_IMAGE_LIMITS`` builds the same model with the
image limits real Qwen2-VL checkpoints ship (a 1024² photo becomes 1,369 image tokens), for
benchmarks at real image sizes. Building it twice gives the same bytes: every random choice
is seeded and nothing depends on time or the host.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BPE_VOCAB_SIZE = 2048
SEED = 1234
IMAGE_MAX_PIXELS = 256 * 28 * 28  # at most 256 image tokens per image
IMAGE_MIN_PIXELS = 4 * 28 * 28


@dataclass(frozen=True)
class ImageLimits:
    """The image processor's pixel bounds: every image is resized to between ``min_pixels``
    and ``max_pixels`` pixels (sides multiples of 28), so one image token per 28x28 pixels."""

    name: str
    min_pixels: int
    max_pixels: int


TINY_IMAGE_LIMITS = ImageLimits("tiny", IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
# the preprocessor_config.json of the Qwen2-VL checkpoints (Qwen2-VL-2B/7B-Instruct)
QWEN2_VL_DEFAULT_IMAGE_LIMITS = ImageLimits("qwen2-vl-default", 56 * 56, 28 * 28 * 16384)
IMAGE_LIMITS = (TINY_IMAGE_LIMITS, QWEN2_VL_DEFAULT_IMAGE_LIMITS)


def image_limits_named(limits: str | ImageLimits) -> ImageLimits:
    """``limits`` itself, or the ``IMAGE_LIMITS`` entry of that name (``ValueError`` if none)."""
    if isinstance(limits, ImageLimits):
        return limits
    for known in IMAGE_LIMITS:
        if known.name == limits:
            return known
    raise ValueError(f"unknown image limits {limits!r}; choose from {', '.join(k.name for k in IMAGE_LIMITS)}")


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the a an image picture photo of in on with and or is are was shows describe what "
    "cat dog bird tree house car road sky sun cloud red green blue yellow white black "
    "small large big little old new bright dark left right top bottom center corner "
    "hello world please answer question user assistant system text token model vision "
    "language serve request response stream health ready batch engine cache one two three "
    "four five six seven eight nine ten zero number color shape circle square line"
).split()


def _training_corpus() -> list[str]:
    """A fixed pseudo-English corpus: same text on every machine, so the same merges."""
    rng = random.Random(SEED)
    lines = []
    for _ in range(4000):
        n = rng.randint(3, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


def build_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = len(tokenizer) + 16  # a few ids the tokenizer never produces: handle them
    head_dim = 16
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    assert sum(text_config["rope_parameters"]["mrope_section"]) * 2 == head_dim
    vision_config = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        mlp_ratio=2,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _fan_in_init(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-initialise weights with fan-in scaling so greedy decoding varies (std 0.02 repeats)."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "norm" in name or name.endswith("ln_q.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _image_processor_config(limits: ImageLimits) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": limits.min_pixels,
        "max_pixels": limits.max_pixels,
        "size": {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def build_tiny_model(directory: str | Path, image_limits: str | ImageLimits = TINY_IMAGE_LIMITS) -> Path:
    """Write the tiny model to ``directory`` (created if needed) and return its path.

    Guarantees: the result loads with transformers' ``AutoModelForImageTextToText``,
    ``AutoTokenizer`` and ``AutoImageProcessor``; the same bytes are written every time.
    ``image_limits`` (an ``ImageLimits`` or its name) sets only the image processor's
    bounds: the weights, tokenizer and config are the same for every choice, and its
    ``max_position_embeddings`` (4096) holds a 1024² image at Qwen2-VL's default limits
    (1,369 image tokens) with its text and output.
    """
    limits = image_limits_named(image_limits)
    from transformers import Qwen2VLForConditionalGeneration

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2VLForConditionalGeneration(config)
    _fan_in_init(model, generator)
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(_image_processor_config(limits), indent=2, sort_keys=True) + "\n"
    )
    return path


def default_tiny_model_dir(image_limits: str | ImageLimits = TINY_IMAGE_LIMITS) -> Path:
    """Where ``vlserve serve`` without ``--model`` keeps the built-in model (user cache dir);
    a variant with other ``image_limits`` lives beside it, under a name that says which."""
    import os

    limits = image_limits_named(image_limits)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = "tiny-qwen2-vl-v1" if limits == TINY_IMAGE_LIMITS else f"tiny-qwen2-vl-v1-{limits.name}"
    return Path(base) / "vlserve" / name


def ensure_tiny_model(directory: str | Path | None = None, image_limits: str | ImageLimits = TINY_IMAGE_LIMITS) -> Path:
    """Build the tiny model (with ``image_limits``) once into ``directory`` (default: the
    user cache, ``default_tiny_model_dir(image_limits)``) and return it.

    The build goes to a temporary sibling first and is renamed into place, so a concurrent
    or interrupted build never leaves a half-written model behind.
    """
    import os
    import shutil
    import tempfile

    target = Path(directory) if directory is not None else default_tiny_model_dir(image_limits)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build_tiny_model(staging, image_limits)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
