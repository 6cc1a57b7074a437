"""Constrained decoding: a grammar per sequence, as a token mask in the batched sampler.

A sequence whose ``SamplingParams.grammar`` is set (llguidance grammar text, as
``llguidance.LLMatcher.grammar_from_json_schema`` gives it: the server builds and validates
it, see ``server.structured_output``) gets a ``GrammarMatcher`` when it joins. Each step,
``allowed_tokens`` builds one boolean mask for the batch (rows without a grammar allow
everything), the sampler sets every disallowed logit to ``-inf`` before sampling, and
the engine feeds the sampled token back with ``GrammarMatcher.accept``. A matcher whose
grammar is complete allows only the end-of-sequence tokens, so the sequence stops there.
The same mask carries ``min_tokens``: a sequence short of it may not sample its stop
tokens (unless its grammar allows nothing else).

``Grammars`` (one per engine core, used by the step thread only) holds llguidance's view
of the tokenizer and compiled grammars by text (at most ``CACHE_SIZE``, least recently
used first out); a new sequence gets a copy of the compiled matcher, so a grammar is
compiled once however many sequences use it. The library is llguidance: one small wheel
with no dependencies, a matcher that never raises on bad grammars or tokens (it enters an
error state, which here allows only end-of-sequence), and per-step cost comparable to
xgrammar's at batch 32 on the tiny model (``python -m bench.grammar_cost``, bench/README.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import llguidance
import llguidance.torch as lltorch
import numpy as np
import torch
from tokenizers import Tokenizer

CACHE_SIZE = 64


class GrammarMatcher:
    """The grammar state of one sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._eos_ids = list(eos_ids)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (packed bits); a matcher
        in an error state allows only end-of-sequence."""
        if self._matcher.is_error():
            bitmask[row].zero_()
            for token in self._eos_ids:
                bitmask[row, token // 32] |= 1 << (token % 32)
            return
        lltorch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        if not self._matcher.is_error():
            self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped() or self._matcher.is_error()


class Grammars:
    """Compiled grammars for one tokenizer. Not thread-safe: the step thread's alone."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Iterable[int]) -> None:
        self._tokenizer_json = tokenizer.to_str()
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def vocab_size(self) -> int:
        """The number of token ids a mask covers (the tokenizer's; higher ids are never allowed)."""
        return self._llg_tokenizer().vocab_size

    def matcher(self, grammar: str) -> GrammarMatcher:
        """A fresh matcher for ``grammar`` (compiled once, then copied)."""
        template = self._compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
            self._compiled[grammar] = template
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return GrammarMatcher(template.deep_copy(), self._eos_ids)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, eos_token=self._eos_ids)
        return self._tokenizer


def allowed_tokens(
    rows: Sequence[tuple[GrammarMatcher | None, Iterable[int]]], vocab: int, grammars: Grammars
) -> torch.Tensor | None:
    """For each sequence's (grammar matcher or ``None``, banned token ids), one row of
    ``vocab`` booleans, ``True`` where the token may be sampled: what the grammar allows,
    less the banned ids (the stop tokens of a sequence short of its ``min_tokens``; a
    complete grammar that allows nothing else wins). ``None`` when no row is constrained:
    the sampler then skips masking, and a step without constraints costs nothing here."""
    constrained = [i for i, (m, _) in enumerate(rows) if m is not None]
    bans = [(i, [t for t in banned if t < vocab]) for i, (_, banned) in enumerate(rows)]
    bans = [(i, ids) for i, ids in bans if ids]
    if not constrained and not bans:
        return None
    allowed = torch.ones(len(rows), vocab, dtype=torch.bool)
    if constrained:
        matchers = [rows[i][0] for i in constrained]
        allowed[constrained] = _grammar_rows(matchers, vocab, grammars.vocab_size)  # type: ignore[arg-type]
    for i, ids in bans:
        allowed[i, ids] = False
        if not bool(allowed[i].any()):
            allowed[i, ids] = True
    return allowed


def _grammar_rows(matchers: Sequence[GrammarMatcher], vocab: int, grammar_vocab: int) -> torch.Tensor:
    rows = range(len(matchers))
    bitmask = lltorch.allocate_token_bitmask(len(rows), grammar_vocab)
    for k in rows:
        matchers[k].fill(bitmask, k)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : min(vocab, grammar_vocab)]
    constrained = torch.zeros(len(rows), vocab, dtype=torch.bool)
    constrained[:, : bits.shape[1]] = torch.from_numpy(bits.astype(bool))
    return constrained
