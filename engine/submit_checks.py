"""What any engine refuses at submit, before a sequence exists: the same rules in-thread
and in a worker process."""

from __future__ import annotations

from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from vl.errors import InvalidRequest


def check_submittable(prompt: EnginePrompt, params: SamplingParams, max_model_len: int, supports_images: bool) -> None:
    """Raise ``InvalidRequest`` for images to a text-only model, an empty prompt, or a
    prompt plus ``max_tokens`` beyond the context length."""
    n = len(prompt.token_ids)
    if prompt.images and not supports_images:
        raise InvalidRequest("This model does not accept images.", param="messages", code="images_not_supported")
    if n == 0:
        raise InvalidRequest("The prompt is empty.", param="messages", code="empty_prompt")
    if n >= max_model_len:
        raise InvalidRequest(
            f"The prompt has {n} tokens; this model's maximum context length is {max_model_len}.",
            param="messages",
            code="context_length_exceeded",
        )
    if n + params.max_tokens > max_model_len:
        raise InvalidRequest(
            f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds the "
            f"maximum context length of {max_model_len}.",
            param="max_tokens",
            code="context_length_exceeded",
        )
