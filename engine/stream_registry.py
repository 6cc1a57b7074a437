"""The open request streams of one engine, by sequence id: what the front end keeps on the
event loop for the consumers of its sequences. No torch import here."""

from __future__ import annotations

import itertools
import random

from engine.prompt import EnginePrompt
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams

# each stream's interval between deltas is stretched by a random 0-50 % (RequestStream)
STREAM_SPREAD = 0.5


class StreamRegistry:
    """Numbers new sequences and keeps their streams until their consumer leaves.

    Every stream gets the engine's ``stream_interval`` and a spread drawn from one random
    generator per engine. Ids are unique per registry (one counter per engine, no
    module-level state). Event loop only.
    """

    def __init__(self, stream_interval: float, rng: random.Random | None = None) -> None:
        self._stream_interval = stream_interval
        self._ids = itertools.count()
        self._rng = rng or random.Random()
        self._streams: dict[int, RequestStream] = {}

    def open(self, prompt: EnginePrompt, params: SamplingParams, *, final_only: bool = False) -> RequestStream:
        """A registered stream for a new sequence of ``prompt``, with a fresh id
        (``final_only``: see ``RequestStream``)."""
        stream = RequestStream(
            next(self._ids),
            len(prompt.token_ids),
            wants_logprobs=params.logprobs is not None,
            final_only=final_only,
            min_interval=self._stream_interval,
            spread=STREAM_SPREAD,
            rng=self._rng,
        )
        self._streams[stream.seq_id] = stream
        return stream

    def close(self, stream: RequestStream) -> None:
        """Forget ``stream`` (its consumer has left); later outputs for it are dropped."""
        self._streams.pop(stream.seq_id, None)

    def get(self, seq_id: int) -> RequestStream | None:
        return self._streams.get(seq_id)

    def open_streams(self) -> list[RequestStream]:
        """The streams still registered, as a list (safe to change the registry meanwhile)."""
        return list(self._streams.values())

    def __len__(self) -> int:
        return len(self._streams)
