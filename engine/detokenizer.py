"""Incremental detokenization with stop strings that never leak into the output.

Text is decoded token by token (``tokenizers``' ``DecodeStream``, O(1) per token, byte
fallback and split UTF-8 handled). Before text is released, any stop string is cut off
with everything after it (or only what follows it, with ``include_stop``), and a tail that could still grow into a stop string is held
back until the next token decides it.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: tuple[str, ...],
        skip_special_tokens: bool = True,
        prompt_tail: list[int] | None = None,
        include_stop: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        # Primed with the prompt's last tokens, so tokenizers that mark word starts
        # (Metaspace: Llama, Mistral) decode the first generated token's leading space.
        self._stream = DecodeStream(ids=list(prompt_tail or []) or None, skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._include_stop = include_stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._text = ""
        self._released = 0
        self._searched = 0

    @property
    def text(self) -> str:
        """All decoded text so far (stop string and what follows it removed once found)."""
        return self._text

    def add(self, token_id: int) -> bool:
        """Decode one more token. Returns True when a stop string has appeared (the text is
        then truncated just before it, or just after it with ``include_stop``: vLLM's
        ``include_stop_str_in_output``). Ids the tokenizer does not know decode to nothing."""
        try:
            piece = self._stream.step(self._tokenizer, token_id)
        except Exception:  # an id outside the tokenizer's vocabulary, or a broken byte run
            piece = None
        if piece:
            self._text += piece
        return self._find_stop()

    def _find_stop(self) -> bool:
        if not self._stop:
            return False
        start = max(0, self._searched - self._max_stop + 1)
        best, found = -1, ""
        for s in self._stop:
            i = self._text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best, found = i, s
        self._searched = len(self._text)
        if best == -1:
            return False
        self._text = self._text[: best + len(found)] if self._include_stop else self._text[:best]
        return True

    def release(self, final: bool) -> str:
        """Text not yet released. Unless ``final``, hold back a suffix that is a prefix of a
        stop string (it may become one)."""
        end = len(self._text)
        if not final and self._stop:
            end -= self._held_back_len()
        end = max(end, self._released)
        out = self._text[self._released : end]
        self._released = end
        return out

    def _held_back_len(self) -> int:
        text = self._text
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token on its own (for logprobs); special tokens included."""
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except Exception:
        return ""
