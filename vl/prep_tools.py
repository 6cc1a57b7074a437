"""The synchronous preparation work of a request, wherever it runs.

``PrepTools`` holds the tokenizer, the media policy and (for VL models) the image
preprocessor, and does the blocking work: chat-template rendering and tokenization,
detokenization, image decode and preprocessing. The event loop never calls it directly:
a ``PrepRunner`` runs its methods under a gate, in a worker thread of the server process
(``ThreadPrep``) or in a prep worker process (``vl.prep_processes.ProcessPrep``), which
builds its own copy from a ``PrepToolsSpec``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from vl.errors import InvalidRequest
from vl.image_decode import decode_image
from vl.image_preprocess import ImagePreprocessor, PixelInputs
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy


class PrepTools:
    """Tokenizer, template and image work. Not thread-safe: each gate's capacity decides how
    many threads may use one instance at once (HF fast tokenizers are not thread-safe)."""

    def __init__(self, tokenizer: Any, policy: MediaPolicy, preprocessor: ImagePreprocessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.policy = policy
        self.preprocessor = preprocessor

    def render_and_tokenize(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat template rendered with a generation prompt.

        Raises ``InvalidRequest`` (param ``messages``) when the model has no chat template
        or the template rejects the messages."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("This model has no chat template; use /v1/completions.", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors: the template rejected these messages
            raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; ids outside the tokenizer's vocabulary are skipped."""
        vocab = len(self.tokenizer)
        return self.tokenizer.decode([t for t in token_ids if 0 <= t < vocab])

    def decode_and_preprocess(self, image: EncodedImage, param: str) -> PixelInputs:
        """Decode ``image`` under the media policy and turn it into the vision tower's
        patches. Raises ``MediaError`` naming ``param`` for bytes that are not an accepted
        image."""
        if self.preprocessor is None:
            raise InvalidRequest("This model does not accept images.", param=param)
        return self.preprocessor(decode_image(image, self.policy, param=param))


def image_cache_key(image: EncodedImage, settings_key: str) -> str:
    """The feature-cache key of an image: its bytes, their encoding and the preprocessor
    settings. Hashing releases the GIL for payloads of more than 2 KiB."""
    return f"{hashlib.sha256(image.payload).hexdigest()}:{int(image.base64_encoded)}:{settings_key}"


@dataclass(frozen=True)
class PrepToolsSpec:
    """What a prep worker process needs to build its own ``PrepTools``: picklable, and
    hashable so a process can keep the tools it built for a spec.

    ``merge_size`` is the vision tower's spatial merge size, or ``None`` for a model
    without images (no image processor is loaded then)."""

    model_dir: str
    policy: MediaPolicy
    merge_size: int | None

    def load(self) -> PrepTools:
        """Load the tokenizer and (for VL models) the image processor from ``model_dir``."""
        from engine.model_loader import load_processors

        tokenizer, image_processor = load_processors(self.model_dir, images=self.merge_size is not None)
        preprocessor = None if image_processor is None else ImagePreprocessor(image_processor, self.merge_size)
        return PrepTools(tokenizer, self.policy, preprocessor)
