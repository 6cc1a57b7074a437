"""``POST /v1/completions`` (prompt: a string, token ids, or a list of either)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from quart import Blueprint, Response

from engine.prompt import EnginePrompt
from server.completion_format import CompletionChunker, completion
from server.errors import token_out_of_vocabulary
from server.generation import complete_jobs, make_jobs
from server.request_body import read_body
from server.request_id import current_request_id
from server.request_observer import current_record
from server.response_meta import ResponseMeta
from server.routes.common import check_model, json_response, serving_runtime
from server.sampling import LengthBudget, sampling_params
from server.schemas.completions import DEFAULT_MAX_TOKENS, CompletionRequest, Prompt
from server.sse import sse_response
from server.state import current_state
from server.streaming import produce_chunks
from vl.errors import InvalidRequest

if TYPE_CHECKING:
    from server.runtime import Runtime

MAX_CHOICES = 256

blueprint = Blueprint("completions", __name__)


async def prompt_of(runtime: Runtime, prompt: Prompt, param: str) -> EnginePrompt:
    """A text prompt tokenized, or token ids checked against the tokenizer's vocabulary
    (``param`` names the prompt in errors)."""
    if isinstance(prompt, str):
        return await runtime.preparer.prepare_text(prompt)
    vocabulary = len(runtime.loaded.tokenizer)
    if prompt and max(prompt) >= vocabulary:
        raise token_out_of_vocabulary(max(prompt), vocabulary, param)
    return EnginePrompt(list(prompt))


@blueprint.post("/v1/completions")
async def completions() -> Response:
    """Generate ``n`` choices for each prompt (text or token ids); choice ``i`` of prompt ``p`` has index
    ``p * n + i``; with ``echo`` each choice's text starts with its prompt. Cancellation:
    every engine sequence is aborted."""
    runtime = serving_runtime()
    body = await read_body(CompletionRequest, current_state().parse_limiter)
    body.check_combinations()
    check_model(body.model, runtime)
    given = body.prompts
    if len(given) * body.n > MAX_CHOICES:
        raise InvalidRequest(f"At most {MAX_CHOICES} choices per request (prompts times 'n').", param="n")
    defaults = runtime.sampling_defaults
    default_max_tokens = min(DEFAULT_MAX_TOKENS, defaults.max_tokens or DEFAULT_MAX_TOKENS)
    prompts, params, texts = [], [], []
    for given_prompt, param in zip(given, body.prompt_params, strict=True):
        prompt = await prompt_of(runtime, given_prompt, param)
        budget = LengthBudget(
            prompt_tokens=len(prompt.token_ids),
            max_model_len=runtime.max_model_len,
            requested=body.max_tokens,
            field="max_tokens",
            default=default_max_tokens,
            prompt_param=param,
        )
        prompts.append(prompt)
        if body.echo:
            texts.append(
                given_prompt if isinstance(given_prompt, str) else await runtime.preparer.detokenize(given_prompt)
            )
        params.append(sampling_params(body, max_tokens=budget.max_tokens(), logprobs=body.logprobs, defaults=defaults))
    jobs = make_jobs(prompts, params)
    meta = ResponseMeta.new("cmpl", runtime.model_name)
    with_logprobs = body.logprobs is not None
    echo = {job.index: texts[job.prompt_index] for job in jobs} if body.echo else {}
    if body.stream:
        chunker = CompletionChunker(meta, include_usage=body.include_usage, logprobs=with_logprobs, echo=echo)
        producer = partial(produce_chunks, runtime.engine, jobs, chunker, body.include_usage, record=current_record())
        return sse_response(producer, current_request_id(), inline=len(jobs) == 1)
    results, usage = await complete_jobs(runtime.engine, jobs, current_record())
    return json_response(completion(meta, results, usage, logprobs=with_logprobs, echo=echo))
