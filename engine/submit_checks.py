"""What any engine refuses at submit, before a sequence exists: the same rules in-thread
and in a worker process."""

from __future__ import annotations

from engine.errors import RequestRejected
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams


def check_submittable(
    prompt: EnginePrompt,
    params: SamplingParams,
    max_model_len: int,
    supports_images: bool,
) -> None:
    """Raise ``RequestRejected`` for images to a text-only model, an empty prompt, or a
    prompt plus ``max_tokens`` beyond the context length."""
    n = len(prompt.token_ids)
    if prompt.images and not supports_images:
        raise RequestRejected(
            "This model does not accept images.",
            kind="images_not_supported",
            subject="images",
        )
    if n == 0:
        raise RequestRejected("The prompt is empty.", kind="empty_prompt", subject="prompt")
    if n >= max_model_len:
        raise RequestRejected(
            f"The prompt has {n} tokens; this model's maximum context length is {max_model_len}.",
            kind="context_length_exceeded",
            subject="prompt",
        )
    if n + params.max_tokens > max_model_len:
        raise RequestRejected(
            f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds the "
            f"maximum context length of {max_model_len}.",
            kind="context_length_exceeded",
            subject="max_tokens",
        )
