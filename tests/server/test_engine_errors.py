"""The engine's refusals become OpenAI errors naming the request field: one translation."""

from __future__ import annotations

import pytest

from engine.errors import RequestRejected, SamplingParamError
from engine.sampling_params import SamplingParams
from server.errors import invalid_request_from_engine


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            SamplingParamError("logprobs", "must be between 0 and 20"),
            ("'top_logprobs' must be between 0 and 20.", "top_logprobs", None),
        ),
        (
            RequestRejected("too long", kind="context_length_exceeded", subject="prompt"),
            ("too long", "messages", "context_length_exceeded"),
        ),
        (
            RequestRejected("no images", kind="images_not_supported", subject="images"),
            ("no images", "messages", "images_not_supported"),
        ),
        (
            RequestRejected("too many", kind="context_length_exceeded", subject="max_tokens"),
            ("too many", "max_tokens", "context_length_exceeded"),
        ),
    ],
)
def test_engine_refusals_name_the_openai_field(error, expected):
    invalid = invalid_request_from_engine(error)
    assert (invalid.message, invalid.param, invalid.code) == expected


def test_sampling_params_name_their_own_fields():
    """The engine says ``logprobs`` (its field); only the server says ``top_logprobs``."""
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(logprobs=21)
    assert info.value.subject == "logprobs"
    assert invalid_request_from_engine(info.value).param == "top_logprobs"
