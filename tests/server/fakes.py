"""A scripted stand-in for ``server.runtime.Runtime``, for deterministic HTTP-layer tests.

``FakeEngine.open_stream`` streams ``script.pieces`` (one token each, ``script.delay``
seconds apart) and records every sequence that was left before its last delta as aborted,
so tests can prove that a disconnect reached the engine. ``FakePreparer`` counts tokens as
characters and can be held at a gate to keep requests "in preparation".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from engine.outputs import StreamDelta, TokenLogprob, TopLogprob
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from server.config import ServerConfig
from server.sampling_defaults import SamplingDefaults
from vl.chat_messages import Chat, TextPart
from vl.chat_preparer import PreparedPrompt
from vl.errors import InvalidRequest, MediaError

FAKE_VOCABULARY = 0x110000  # the fake tokenizer's ids are code points


class FakeTokenizer:
    """What the routes ask of the real tokenizer outside preparation: its size."""

    def __len__(self) -> int:
        return FAKE_VOCABULARY


@dataclass
class Script:
    """What every fake sequence generates."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    delay: float = 0.0
    finish_reason: str = "stop"
    fail_after: int | None = None  # raise RuntimeError after this many deltas
    error_after: int | None = None  # end with "abort" and stream.error after this many


@dataclass(frozen=True)
class FakeStatistics:
    running: int
    waiting: int
    steps: int


class FakeStream:
    def __init__(self, engine: FakeEngine, prompt: EnginePrompt, params: SamplingParams) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        self.finished = False
        self.error: str | None = None

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._deltas()

    def _logprobs(self, piece: str, position: int) -> list[TokenLogprob] | None:
        if self._params.logprobs is None:
            return None
        top = [TopLogprob(token_id=k, token=f"alt{k}", logprob=-1.0 - k) for k in range(self._params.logprobs)]
        return [TokenLogprob(token_id=position, token=piece, logprob=-0.25, top=top)]

    async def _deltas(self) -> AsyncIterator[StreamDelta]:
        script = self._engine.script
        pieces = script.pieces[: self._params.max_tokens]
        truncated = len(script.pieces) > self._params.max_tokens
        for position, piece in enumerate(pieces):
            if script.delay:
                await trio.sleep(script.delay)
            else:
                await trio.lowlevel.checkpoint()
            if script.fail_after is not None and position >= script.fail_after:
                raise RuntimeError("secret internal detail")
            last = position == len(pieces) - 1
            failed = script.error_after is not None and position >= script.error_after
            finish = None
            if failed:
                finish, self.error = "abort", "FakeError: forward failed"
            elif last:
                finish = "length" if truncated else script.finish_reason
            self._engine.steps += 1
            yield StreamDelta(
                text="" if failed else piece,
                token_ids=[] if failed else [position],
                logprobs=None if failed else self._logprobs(piece, position),
                finish_reason=finish,
                prompt_tokens=len(self._prompt.token_ids),
                completion_tokens=position + (0 if failed else 1),
            )
            if finish is not None:
                self.finished = True
                return


class FakeEngine:
    def __init__(self) -> None:
        self.script = Script()
        self.opened: list[tuple[EnginePrompt, SamplingParams]] = []
        self.final_only: list[bool] = []  # per opened stream
        self.aborted = 0
        self.completed = 0
        self.running = 0
        self.steps = 0
        self.healthy = True
        self.changed = trio.Event()

    @asynccontextmanager
    async def open_stream(
        self, prompt: EnginePrompt, params: SamplingParams, lease=None, *, final_only: bool = False
    ) -> AsyncIterator[FakeStream]:
        """The script's deltas one by one (``final_only`` is recorded, not acted on: a
        consumer takes one delta or many alike)."""
        if len(prompt.token_ids) + params.max_tokens > 1 << 20:
            raise InvalidRequest("too long for the fake", param="max_tokens")
        self.opened.append((prompt, params))
        self.final_only.append(final_only)
        self.running += 1
        stream = FakeStream(self, prompt, params)
        try:
            yield stream
        finally:
            self.running -= 1
            if stream.finished:
                self.completed += 1
            else:
                self.aborted += 1
            self.changed.set()
            self.changed = trio.Event()

    async def wait_idle(self) -> None:
        """Wait until no sequence is running."""
        while self.running:
            await self.changed.wait()

    def statistics(self) -> FakeStatistics:
        return FakeStatistics(running=self.running, waiting=0, steps=self.steps)

    def is_healthy(self) -> bool:
        return self.healthy


def _text_of(chat: Chat) -> tuple[str, int]:
    text = "".join(
        m.content if isinstance(m.content, str) else "".join(p.text for p in m.content if isinstance(p, TextPart))
        for m in chat.messages
    )
    images = chat.images()
    for ref in images:
        if ref.image.url.startswith("bad:"):
            raise MediaError("The image could not be decoded.", param=ref.param, code="invalid_image")
    return text, len(images)


class FakePreparer:
    """One token per character (plus 4 per image). ``gate``: if set, preparation waits on it."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.gate: trio.Event | None = None
        self.entered = 0

    async def _wait_gate(self) -> None:
        self.entered += 1
        if self.gate is not None:
            await self.gate.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def prepare_chat(self, chat: Chat) -> PreparedPrompt:
        """As ``ChatPreparer.prepare_chat``, with no pixel slots (no lease)."""
        self.calls.append(chat)
        await self._wait_gate()
        text, images = _text_of(chat)
        return PreparedPrompt(EnginePrompt(token_ids=[ord(c) for c in text] + [0] * (4 * images)))

    async def prepare_text(self, prompt: str) -> EnginePrompt:
        self.calls.append(prompt)
        await self._wait_gate()
        return EnginePrompt(token_ids=[ord(c) for c in prompt])

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        await self._wait_gate()
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    async def tokenize_chat(self, chat: Chat) -> list[int]:
        await self._wait_gate()
        text, images = _text_of(chat)
        return [ord(c) for c in text] + [0] * images

    async def detokenize(self, token_ids: list[int]) -> str:
        await self._wait_gate()
        return "".join(chr(t) for t in token_ids if 1 < t < FAKE_VOCABULARY and not 0xD800 <= t < 0xE000)


@dataclass
class FakeLoaded:
    path: Path = Path("/fake/model")
    device: str = "cpu"
    dtype: str = "float32"
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)


@dataclass
class FakeRuntime:
    config: ServerConfig
    model_name: str = "fake-model"
    created: int = field(default_factory=lambda: int(time.time()))
    max_model_len: int = 256
    engine: FakeEngine = field(default_factory=FakeEngine)
    preparer: FakePreparer = field(default_factory=FakePreparer)
    loaded: FakeLoaded = field(default_factory=FakeLoaded)
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)


class FakeRuntimeFactory:
    """``factory(config)`` opens ``runtime``; ``load_gate`` delays loading, ``fail`` breaks it."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.load_gate: trio.Event | None = None
        self.fail: Exception | None = None
        self.opened = 0
        self.closed = 0

    @asynccontextmanager
    async def __call__(self, config: ServerConfig) -> AsyncIterator[FakeRuntime]:
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.fail is not None:
            raise self.fail
        self.opened += 1
        try:
            yield self.runtime
        finally:
            self.closed += 1
