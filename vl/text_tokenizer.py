"""The model's tokenizer for a process that only renders chats and tokenizes: a copy of a
loaded Hugging Face fast tokenizer that needs neither torch nor transformers' model stack.

A prep worker process renders chat templates, tokenizes and detokenizes; it never runs the
model. Loading its tokenizer with ``AutoTokenizer`` imports torch anyway (transformers'
``configuration_utils`` imports ``modeling_rope_utils``, which imports torch whenever it is
installed): ~140 MiB of private memory and seconds of start-up per process, for nothing.

``TokenizerSnapshot.of(tokenizer)`` takes what a loaded fast tokenizer does its work with:
its Rust pipeline exactly as loaded (``backend_tokenizer.to_str()``: vocabulary, merges,
normalizer, pre-tokenizer, post-processor, added tokens), its named special tokens, chat
template(s) and decode clean-up. ``TextTokenizer`` rebuilds the pipeline with the
``tokenizers`` library and answers the calls prep makes (``apply_chat_template``,
``__call__``, ``decode``, ``len``, ``convert_tokens_to_ids``) as the tokenizer's own
methods do: templates are rendered by transformers' own ``render_jinja_template`` (its
sandbox and filters; that module imports no torch). The snapshot is taken only from a
tokenizer whose class keeps transformers' own versions of those methods, so the copy
computes the same thing; tests compare the two token for token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tokenizers

# A chat template, or named templates as (name, template) pairs (hashable).
TemplateValue = str | tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TokenizerSnapshot:
    """What ``TextTokenizer`` needs of a loaded fast tokenizer. Picklable and hashable; the
    pipeline is a JSON string (a few MB for a 150k-token vocabulary), so it travels once
    per process, not with every call."""

    pipeline: str  # backend_tokenizer.to_str()
    special_tokens: tuple[tuple[str, str], ...]  # special_tokens_map, in its order
    chat_template: TemplateValue | None  # a template, or (name, template) pairs
    clean_up_spaces: bool  # what decode's clean-up setting comes to (see ``of``)
    split_special_tokens: bool

    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerSnapshot | None:
        """The snapshot of ``tokenizer`` (a ``TextTokenizer`` gives the one it was built
        from), or ``None`` where ``TextTokenizer`` would not compute what it computes: a
        tokenizer that is not a transformers fast (``tokenizers``-backed) tokenizer, or
        whose class replaces any of the methods ``TextTokenizer`` reproduces (encoding,
        decoding and its clean-up, template choice and rendering)."""
        if isinstance(tokenizer, TextTokenizer):
            return tokenizer.snapshot
        try:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            return None
        kind = type(tokenizer)
        if not isinstance(tokenizer, TokenizersBackend):
            return None
        kept = all(
            getattr(kind, name) is getattr(base, name)
            for base, names in (
                (TokenizersBackend, ("_encode_plus", "_decode", "__len__", "_convert_token_to_id_with_added_voc")),
                (
                    PreTrainedTokenizerBase,
                    ("apply_chat_template", "get_chat_template", "clean_up_tokenization", "decode", "__call__"),
                ),
            )
            for name in names
        )
        if not kept:
            return None
        template = tokenizer.chat_template
        if isinstance(template, Mapping):
            template = tuple((str(name), str(text)) for name, text in template.items())
        backend = tokenizer.backend_tokenizer
        clean_up = bool(tokenizer.clean_up_tokenization_spaces) and not (
            type(backend.model).__name__ == "BPE"
            and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        )
        return cls(
            pipeline=backend.to_str(),
            special_tokens=tuple(tokenizer.special_tokens_map.items()),
            chat_template=template,
            clean_up_spaces=clean_up,
            split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
        )


class TextTokenizer:
    """A tokenizer built from a ``TokenizerSnapshot``: the calls prep makes, answered as
    the snapshot's tokenizer answers them. Not thread-safe (the Rust tokenizer is not);
    one gate token uses it at a time, as with Hugging Face's."""

    def __init__(self, snapshot: TokenizerSnapshot) -> None:
        self.snapshot = snapshot
        self._backend = tokenizers.Tokenizer.from_str(snapshot.pipeline)
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = snapshot.split_special_tokens
        self._special_tokens = dict(snapshot.special_tokens)
        template = snapshot.chat_template
        self.chat_template: str | dict[str, str] | None = dict(template) if isinstance(template, tuple) else template
        self._clean_up_spaces = snapshot.clean_up_spaces

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special_tokens)

    @property
    def eos_token_id(self) -> int | None:
        eos = self._special_tokens.get("eos_token")
        return None if eos is None else self.convert_tokens_to_ids(eos)

    def __len__(self) -> int:
        """The vocabulary with its added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": ...}`` of ``text``, as the tokenizer's ``__call__`` gives them
        for one string without padding or truncation."""
        return {"input_ids": self._backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """The id of ``token``; the unknown token's id (or ``None``) if it has none."""
        index = self._backend.token_to_id(token)
        if index is None and "unk_token" in self._special_tokens:
            return self._backend.token_to_id(self._special_tokens["unk_token"])
        return index

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: list[dict] | None = None,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """The chat rendered with the model's template (the ``tool_use`` one of named
        templates when ``tools`` are given, else ``default``), and tokenized unless
        ``tokenize`` is false: the tokenizer's ``apply_chat_template`` for one chat, without
        documents or a continued final message. ``kwargs`` reach the template beside the
        named special tokens (and win over them). Raises what rendering raises (jinja
        errors, ``raise_exception`` in the template) and ``ValueError`` without a template
        or an empty chat."""
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self._template_for(tools)
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        rendered, _ = render_jinja_template(
            # keys whose value is None are dropped first, as transformers does (templates
            # handle a missing key, not a literal None)
            conversations=[[{k: v for k, v in message.items() if v is not None} for message in conversation]],
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **{**self._special_tokens, **kwargs},
        )
        return self(rendered[0], add_special_tokens=False)["input_ids"] if tokenize else rendered[0]

    def _template_for(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(f"This model has multiple chat templates with no default: {sorted(template)}.")
        if template is None:
            raise ValueError("This tokenizer has no chat template.")
        return template


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English
    contractions."""
    for spaced, joined in _CLEAN_UPS:
        text = text.replace(spaced, joined)
    return text


_CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip
