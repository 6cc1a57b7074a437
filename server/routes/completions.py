"""``POST /v1/completions`` (prompt string or list of strings)."""

from __future__ import annotations

from functools import partial

from quart import Blueprint, Response

from server.completion_format import CompletionChunker, completion
from server.generation import complete_jobs, make_jobs
from server.request_body import read_body
from server.request_id import current_request_id
from server.response_meta import ResponseMeta
from server.routes.common import check_model, json_response, serving_runtime
from server.sampling import LengthBudget, sampling_params
from server.schemas.completions import DEFAULT_MAX_TOKENS, CompletionRequest
from server.sse import sse_response
from server.state import current_state
from server.streaming import produce_chunks
from vl.errors import InvalidRequest

MAX_CHOICES = 256

blueprint = Blueprint("completions", __name__)


@blueprint.post("/v1/completions")
async def completions() -> Response:
    """Generate ``n`` choices for each prompt; choice ``i`` of prompt ``p`` has index
    ``p * n + i``; with ``echo`` each choice's text starts with its prompt. Cancellation:
    every engine sequence is aborted."""
    runtime = serving_runtime()
    body = await read_body(CompletionRequest, current_state().parse_limiter)
    body.check_combinations()
    check_model(body.model, runtime)
    texts = body.prompts
    if len(texts) * body.n > MAX_CHOICES:
        raise InvalidRequest(f"At most {MAX_CHOICES} choices per request (prompts times 'n').", param="n")
    prompts, params = [], []
    for position, text in enumerate(texts):
        prompt = await runtime.preparer.prepare_text(text)
        budget = LengthBudget(
            prompt_tokens=len(prompt.token_ids),
            max_model_len=runtime.max_model_len,
            requested=body.max_tokens,
            field="max_tokens",
            default=DEFAULT_MAX_TOKENS,
            prompt_param="prompt" if isinstance(body.prompt, str) else f"prompt[{position}]",
        )
        prompts.append(prompt)
        params.append(sampling_params(body, max_tokens=budget.max_tokens(), logprobs=body.logprobs))
    jobs = make_jobs(prompts, params)
    meta = ResponseMeta.new("cmpl", runtime.model_name)
    with_logprobs = body.logprobs is not None
    echo = {job.index: texts[job.prompt_index] for job in jobs} if body.echo else {}
    if body.stream:
        chunker = CompletionChunker(meta, include_usage=body.include_usage, logprobs=with_logprobs, echo=echo)
        producer = partial(produce_chunks, runtime.engine, jobs, chunker, body.include_usage)
        return sse_response(producer, current_request_id())
    results, usage = await complete_jobs(runtime.engine, jobs)
    return json_response(completion(meta, results, usage, logprobs=with_logprobs, echo=echo))
