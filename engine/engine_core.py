"""One engine step, synchronously: image encoding, forwards, sampling, detokenization and
stop checks.

Runs in the step loop (``engine.step_loop``). It reads and writes only the sequences in
the plan it was given, and reports what changed as immutable ``SequenceOutput``s.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from engine.block_manager import BlockManager
from engine.core_messages import SequenceOutput
from engine.detokenizer import IncrementalDetokenizer, token_text
from engine.grammar import GrammarMatcher, Grammars, allowed_tokens
from engine.image_encoder import AHEAD_FORWARDS, ImageEncoder, ImageEncodingFailed, LargeImageThreads, ViewPixels
from engine.model_runner import ModelRunner, bytes_per_token
from engine.outputs import TokenLogprob, TopLogprob
from engine.prompt import EnginePrompt
from engine.sampler import SampledToken, Sampler
from engine.scheduler import StepPlan
from engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.model_loader import LoadedModel


PROMPT_TAIL_TOKENS = 4
AUTO_KV_FRACTION = 0.5  # of free device memory, at most, for an automatically sized KV cache
logger = logging.getLogger("vlserve.engine")


def free_device_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (on a CPU: the host's available memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_blocks_for(loaded: LoadedModel, config: EngineConfig) -> BlockManager:
    """The block accounting of the KV cache for ``loaded``: ``config.kv_cache_memory`` MiB
    of blocks (0: ``max_num_seqs`` x ``max_model_len`` tokens, at most ``AUTO_KV_FRACTION``
    of free device memory). Raises ``ValueError`` if one sequence of the model's full
    context length would not fit."""
    per_token = bytes_per_token(loaded.adapter)
    block_bytes = per_token * config.kv_block_size
    if config.kv_cache_memory > 0:
        budget = int(config.kv_cache_memory * 2**20)
    else:
        wanted = config.max_num_seqs * loaded.max_model_len * per_token
        budget = min(wanted, int(AUTO_KV_FRACTION * free_device_memory(loaded.device)))
    num_blocks = budget // block_bytes
    needed = -(-loaded.max_model_len // config.kv_block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache ({budget / 2**20:.2f} MiB: {num_blocks} blocks of {config.kv_block_size} tokens, "
            f"{per_token} bytes a token) cannot hold one sequence of max_model_len={loaded.max_model_len} tokens "
            f"({needed} blocks, {needed * block_bytes / 2**20:.2f} MiB): raise --kv-cache-memory or lower --max-model-len"
        )
    image_token_id = getattr(loaded.adapter, "image_token_id", None)
    return BlockManager(
        num_blocks, config.kv_block_size, prefix_caching=config.prefix_caching, image_token_id=image_token_id
    )


@dataclass
class _SeqState:
    """Step-thread-private per-sequence helpers."""

    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    grammar: GrammarMatcher | None = None


@dataclass
class StepReport:
    updates: list[SequenceOutput] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    seconds: float = 0.0


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        sampler: Sampler | None = None,
        *,
        decode_steps_per_call: int = 1,
        has_news: Callable[[], bool] = lambda: False,
        encoder: ImageEncoder | None = None,
    ) -> None:
        self.runner = runner
        self.encoder = encoder
        self.decode_steps_per_call = decode_steps_per_call
        self._has_news = has_news
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.sampler = sampler or Sampler()
        self._states: dict[int, _SeqState] = {}
        self._grammars = Grammars(tokenizer, eos_token_ids)

    @classmethod
    def for_model(
        cls,
        loaded: LoadedModel,
        config: EngineConfig,
        *,
        has_news: Callable[[], bool] = lambda: False,
        view_pixels: ViewPixels | None = None,
    ) -> EngineCore:
        """The core for a loaded model: its runner, tokenizer, stop ids and limits (the
        context length is the loaded model's), and for a vision model its image encoder,
        which reads pixels in place with ``view_pixels`` (``SlotMemory.view``)."""
        encoder = None
        if loaded.supports_images:
            encoder = ImageEncoder(
                loaded.adapter.encode_images,
                view_pixels,
                max_batch_images=config.vision_max_batch_size,
                max_batch_patches=config.vision_max_batch_patches,
                cache_bytes=config.mm_cache_mb << 20,
                # encoder_threads 0 (in-thread placement) never raises the step thread's count
                large_image=LargeImageThreads(config.encoder_threads, config.encoder_threads_min_patches),
                ahead_forwards=AHEAD_FORWARDS if config.encodes_ahead(loaded.device.type) else 0,
            )
        blocks = kv_blocks_for(loaded, config)
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), prefix caching %s",
            blocks.num_blocks,
            blocks.block_size,
            blocks.num_blocks * blocks.block_size,
            blocks.num_blocks * blocks.block_size * bytes_per_token(loaded.adapter) / 2**20,
            "on" if blocks.prefix_caching else "off",
        )
        return cls(
            ModelRunner(loaded.adapter, loaded.device, blocks),
            loaded.tokenizer.backend_tokenizer,
            loaded.eos_token_ids,
            loaded.max_model_len,
            Sampler(config.seed),
            decode_steps_per_call=config.decode_steps_per_call,
            has_news=has_news,
            encoder=encoder,
        )

    def execute(self, plan: StepPlan) -> StepReport:
        """Run one step (see ``_execute``). Never raises for a step's own failure: as a
        last resort every sequence in the plan is failed and the batch cache is reset."""
        try:
            return self._execute(plan)
        except Exception as exc:
            report = StepReport()
            everyone = plan.decoding + plan.continuing + plan.joining
            self.runner.reset()
            for seq in plan.leaving + everyone:
                self._states.pop(seq.seq_id, None)
                self.release_images(seq)
            report.updates = [self._fail(seq, exc) for seq in everyone]
            return report

    def _execute(self, plan: StepPlan) -> StepReport:
        """Forget leaving and preempted rows, decode the running ones, encode the joining
        ones' images and run the step's prefill chunks.

        A joining sequence whose image fails to encode finishes alone with ``"abort"``. If
        a forward raises, the sequences of that forward (the decoding rows, or the
        prefilling ones) finish with reason ``"abort"`` and an error message, their rows are
        dropped, and the engine goes on with the rest.
        """
        started = time.perf_counter()
        report = StepReport()
        for seq in plan.leaving:
            self._states.pop(seq.seq_id, None)
        self.runner.drop(plan.leaving + plan.preempted)
        if plan.decoding:
            try:
                logits = self.runner.decode(plan.decoding)
                report.decode_tokens += len(plan.decoding)
                self._append(plan.decoding, logits, report)
            except Exception as exc:  # a failed forward fails its rows, not the engine
                self._fail_all(plan.decoding, exc, report)
        joining = set(map(id, self._encode_images(self._admit(plan.joining, report), report)))
        chunks = [(seq, n) for seq, n in plan.prefill if seq in plan.continuing or id(seq) in joining]
        if chunks:
            self._prefill(chunks, report)
        # a step that prefilled sends now: its first tokens do not wait behind more decodes
        for _ in range(0 if chunks else self.decode_steps_per_call - 1):
            if not self._decode_again(report):
                break
        report.seconds = time.perf_counter() - started
        return report

    def _decode_again(self, report: StepReport) -> bool:
        """One more decode step in the same call, only while nothing needs the scheduler:
        no row finished, asked to abort or is part-way through its prompt, nobody waits to
        join, and the rows' next tokens fit in their blocks; ``_execute`` asks for none in
        a step that ran prefill chunks, so a new sequence's first token is sent as soon as
        it exists. Saves a round trip through a busy event loop per token; an abort still
        frees its rows after at most the sub-step that was running when it arrived."""
        rows = self.runner.rows
        if not rows or self._has_news() or any(s.finished or s.abort_requested or not s.prefilled for s in rows):
            return False
        if not self.runner.blocks.allocate_all([(s, s.num_tokens) for s in rows]):
            return False
        try:
            logits = self.runner.decode(rows)
            report.decode_tokens += len(rows)
            self._append(rows, logits, report)
        except Exception as exc:
            self._fail_all(rows, exc, report)
            return False
        return True

    def _prefill(self, chunks: list[tuple[Sequence, int]], report: StepReport) -> None:
        """Run the step's prefill chunks together, then sample for each sequence whose
        chunk reached its last token. If the forward fails, retry each chunk alone so one
        bad prompt fails only itself."""
        try:
            logits = self.runner.prefill(chunks)
        except Exception as exc:
            if len(chunks) == 1:
                self._fail_all([chunks[0][0]], exc, report)
                return
            for chunk in chunks:
                self._prefill([chunk], report)
            return
        report.prefill_tokens += sum(n for _, n in chunks)
        done = [i for i, (seq, _) in enumerate(chunks) if seq.num_computed_tokens >= seq.num_tokens]
        if not done:
            return
        seqs = [chunks[i][0] for i in done]
        try:
            self._append(seqs, logits[done], report)
        except Exception as exc:
            self._fail_all(seqs, exc, report)

    def _encode_images(self, joining: list[Sequence], report: StepReport) -> list[Sequence]:
        """Encode the joining sequences' pending images together (``ImageEncoder``) and
        give each its features; the encoder then holds nothing for them. A sequence with
        an image that failed is failed alone."""
        if self.encoder is None:
            return joining
        failures = self.encoder.encode([seq.seq_id for seq in joining])
        ready = []
        for seq in joining:
            try:
                if seq.seq_id in failures:
                    raise ImageEncodingFailed(failures[seq.seq_id])
                if self.encoder.holds(seq.seq_id):
                    seq.prompt = EnginePrompt(seq.prompt.token_ids, self.encoder.features(seq.seq_id))
            except Exception as exc:
                report.updates.append(self._fail(seq, exc))
            else:
                ready.append(seq)
            finally:
                self.encoder.release(seq.seq_id)
        return ready

    def admit_images(self, seq: Sequence) -> None:
        """Hand a new sequence's images to the encoder (it reads their pixels in their slots
        until they are encoded, ``ImageEncoder.take_slots_done``). Raises if they cannot be
        read; the encoder then holds nothing for it."""
        if self.encoder is not None and seq.prompt.images:
            self.encoder.admit(seq.seq_id, seq.prompt.images)

    def release_images(self, seq: Sequence) -> None:
        """The sequence left while waiting (before its images were used, or preempted):
        forget its images and its state (idempotent)."""
        self._states.pop(seq.seq_id, None)
        if self.encoder is not None:
            self.encoder.release(seq.seq_id)

    def _admit(self, seqs: list[Sequence], report: StepReport) -> list[Sequence]:
        """Set up per-sequence state (kept by a preempted sequence that joins again); a
        sequence whose setup fails is failed alone."""
        admitted = []
        for seq in seqs:
            if seq.seq_id in self._states:
                admitted.append(seq)
                continue
            try:
                self._states[seq.seq_id] = self._new_state(seq)
            except Exception as exc:
                self.release_images(seq)
                report.updates.append(self._fail(seq, exc))
            else:
                admitted.append(seq)
        return admitted

    def _new_state(self, seq: Sequence) -> _SeqState:
        p = seq.params
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        return _SeqState(
            detokenizer=IncrementalDetokenizer(
                self.tokenizer,
                p.stop,
                p.skip_special_tokens,
                seq.prompt.token_ids[-PROMPT_TAIL_TOKENS:],
                include_stop=p.include_stop_str_in_output,
            ),
            generator=self.sampler.new_generator(p),
            stop_ids=stop_ids,
            grammar=None if p.grammar is None else self._grammars.matcher(p.grammar),
        )

    def _append(self, seqs: list[Sequence], logits: torch.Tensor, report: StepReport) -> None:
        states = [self._states[s.seq_id] for s in seqs]
        constraints = [
            (st.grammar, st.stop_ids if len(s.output_ids) < s.params.min_tokens else ())
            for s, st in zip(seqs, states, strict=True)
        ]
        sampled = self.sampler.sample(
            logits,
            [s.params for s in seqs],
            [(s.prompt.token_ids, s.output_ids) for s in seqs],
            [st.generator for st in states],
            allowed_tokens(constraints, logits.shape[-1], self._grammars),
        )
        for seq, state, tok in zip(seqs, states, sampled, strict=True):
            report.updates.append(self._advance(seq, state, tok))

    def _advance(self, seq: Sequence, state: _SeqState, tok: SampledToken) -> SequenceOutput:
        seq.output_ids.append(tok.token_id)
        finish = None
        if state.grammar is not None:
            state.grammar.accept(tok.token_id)
        if tok.token_id in state.stop_ids or state.detokenizer.add(tok.token_id):
            finish = "stop"
        elif state.grammar is not None and state.grammar.done:
            finish = "stop"
        elif finish is None and (len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [self._logprob_entry(tok)]
        if finish is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = finish
            self._states.pop(seq.seq_id, None)
        text = state.detokenizer.release(final=finish is not None)
        return SequenceOutput(seq.seq_id, [tok.token_id], text, logprobs, finish)

    def _logprob_entry(self, tok: SampledToken) -> TokenLogprob:
        return TokenLogprob(
            token_id=tok.token_id,
            token=token_text(self.tokenizer, tok.token_id),
            logprob=tok.logprob,
            top=[TopLogprob(i, token_text(self.tokenizer, i), lp) for i, lp in tok.top],
        )

    def _fail_all(self, seqs: list[Sequence], exc: Exception, report: StepReport) -> None:
        failed = {s.seq_id for s in seqs}
        report.updates = [u for u in report.updates if u.seq_id not in failed]
        self.runner.drop(seqs)
        report.updates.extend(self._fail(seq, exc) for seq in seqs)

    def _fail(self, seq: Sequence, exc: Exception) -> SequenceOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        seq.error = f"{type(exc).__name__}: {exc}"
        self._states.pop(seq.seq_id, None)
        return SequenceOutput(seq.seq_id, [], "", None, "abort", seq.error)
