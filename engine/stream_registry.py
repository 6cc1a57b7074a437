"""The open request streams of one engine, by sequence id: what both engine placements
(in a thread, in a worker process) keep on the event loop for their consumers."""

from __future__ import annotations

import random

from engine.prompt import EnginePrompt
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceIds

# each stream's interval between deltas is stretched by a random 0-50 % (RequestStream)
STREAM_SPREAD = 0.5


class StreamRegistry:
    """Numbers new sequences and keeps their streams until their consumer leaves.

    Every stream gets the engine's ``stream_interval`` and a spread drawn from one random
    generator per engine. Event loop only.
    """

    def __init__(self, stream_interval: float) -> None:
        self._stream_interval = stream_interval
        self._ids = SequenceIds()
        self._rng = random.Random()
        self._streams: dict[int, RequestStream] = {}

    def open(self, prompt: EnginePrompt, params: SamplingParams) -> RequestStream:
        """A new sequence for ``prompt`` and its registered stream."""
        seq = Sequence(self._ids.next(), prompt, params)
        stream = RequestStream(seq, self._stream_interval, STREAM_SPREAD, self._rng)
        self._streams[seq.seq_id] = stream
        return stream

    def close(self, stream: RequestStream) -> None:
        """Forget ``stream`` (its consumer has left); later updates for it are dropped."""
        self._streams.pop(stream.seq.seq_id, None)

    def get(self, seq_id: int) -> RequestStream | None:
        return self._streams.get(seq_id)

    def open_streams(self) -> list[RequestStream]:
        """The streams still registered, as a list (safe to change the registry meanwhile)."""
        return list(self._streams.values())

    def __len__(self) -> int:
        return len(self._streams)
