"""``TextTokenizer`` (a prep process's tokenizer, rebuilt without torch from a
``TokenizerSnapshot``) answers every call prep makes as the Hugging Face tokenizer it was
taken from does, token for token and character for character."""

from __future__ import annotations

import pickle

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.tiny_model import SPECIAL_TOKENS, _training_corpus
from vl.text_tokenizer import TextTokenizer, TokenizerSnapshot

TEXTS = [
    "hello world",
    "",
    "  leading and trailing spaces  ",
    "new\nlines\n\n\tand tabs\r\n",
    "émoji 🎉, accents (café, naïve) and 中文字符",
    "<|im_start|>user\nhi<|im_end|>",
    "inline <|image_pad|><|vision_start|> tokens<|endoftext|>",
    "don't stop , they 're here . Isn't it ? yes !",
    "numbers 12345 3.14159 -7e10",
    "a" * 300,
]

TOOL_TEMPLATE = (
    "{{ bos_token or '' }}{% if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'forbidden' %}{{ raise_exception('no forbidden roles') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% if m.get('tool_calls') is not none %}CALLS{% endif %}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}{{ extra | default('') }}"
)


def copy_of(hf_tokenizer) -> TextTokenizer:
    """The tokenizer as a prep process gets it: snapshot, pickled, rebuilt."""
    snapshot = TokenizerSnapshot.of(hf_tokenizer)
    assert snapshot is not None
    return TextTokenizer(pickle.loads(pickle.dumps(snapshot)))


def assert_same_answers(hf_tokenizer, copy: TextTokenizer) -> None:
    assert len(copy) == len(hf_tokenizer)
    assert copy.eos_token_id == hf_tokenizer.eos_token_id
    assert copy.special_tokens_map == hf_tokenizer.special_tokens_map
    for token in (*SPECIAL_TOKENS, "hello", "not-a-token-at-all"):
        assert copy.convert_tokens_to_ids(token) == hf_tokenizer.convert_tokens_to_ids(token), token
    for text in TEXTS:
        for special in (True, False):
            expected = hf_tokenizer(text, add_special_tokens=special)["input_ids"]
            assert copy(text, add_special_tokens=special)["input_ids"] == expected, (text, special)
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert copy.decode(ids) == hf_tokenizer.decode(ids), text
    every = list(range(len(hf_tokenizer)))
    for ids in (every, every[::-7], [5, 900, 3, 2049, 17]):
        for skip in (False, True):
            assert copy.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


CHATS = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is"}, {"type": "image"}, {"type": "text", "text": "?"}],
        },
        {"role": "assistant", "content": "a cat", "tool_calls": None},
        {"role": "user", "content": "and now? émoji 🎉"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_served_models_tokenizer_is_copied_token_for_token(hf_tokenizer):
    assert_same_answers(hf_tokenizer, copy_of(hf_tokenizer))


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_templates_render_as_the_tokenizer_renders_them(hf_tokenizer, chat, generation_prompt):
    """Text and token ids of the model's template, with keys whose value is None dropped
    as transformers drops them."""
    copy = copy_of(hf_tokenizer)
    for tokenize in (False, True):
        expected = hf_tokenizer.apply_chat_template(
            chat, tokenize=tokenize, add_generation_prompt=generation_prompt, return_dict=False
        )
        assert copy.apply_chat_template(chat, tokenize=tokenize, add_generation_prompt=generation_prompt) == expected


def test_tools_special_tokens_extra_variables_and_template_errors_reach_the_template(tiny_model_dir):
    """A template that reads ``tools`` (``tojson``), the named special tokens and an extra
    variable renders the same; ``raise_exception`` raises from both."""
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf_tokenizer.chat_template = TOOL_TEMPLATE
    copy = copy_of(hf_tokenizer)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    chat = [{"role": "user", "content": "weather? ünïcode"}, {"role": "assistant", "content": "x", "tool_calls": []}]
    for kwargs in ({}, {"tools": tools}, {"tools": tools, "extra": "!"}):
        expected = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        assert copy.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs) == expected
        assert "[TOOLS]" in expected if "tools" in kwargs else "[TOOLS]" not in expected
    for tokenizer in (hf_tokenizer, copy):
        with pytest.raises(Exception, match="no forbidden roles"):
            tokenizer.apply_chat_template([{"role": "forbidden", "content": "x"}], tokenize=False)
        with pytest.raises(ValueError):
            tokenizer.apply_chat_template([], tokenize=False)


def test_named_templates_pick_tool_use_with_tools_and_default_without(tiny_model_dir):
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf_tokenizer.chat_template = {"default": "D{{ messages[0]['content'] }}", "tool_use": "T{{ tools | length }}"}
    copy = copy_of(hf_tokenizer)
    chat = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    for kwargs in ({}, {"tools": tools}):
        expected = hf_tokenizer.apply_chat_template(chat, tokenize=False, **kwargs)
        assert copy.apply_chat_template(chat, tokenize=False, **kwargs) == expected
    assert copy.apply_chat_template(chat, tokenize=False, tools=tools) == "T1"
    hf_tokenizer.chat_template = {"other": "O"}
    for tokenizer in (hf_tokenizer, copy_of(hf_tokenizer)):
        with pytest.raises(ValueError, match="no default"):
            tokenizer.apply_chat_template(chat, tokenize=False)
    hf_tokenizer.chat_template = None
    assert copy_of(hf_tokenizer).chat_template is None


def test_a_qwen2_class_tokenizer_is_copied_token_for_token(tmp_path, hf_tokenizer):
    """Real Qwen2-VL models name ``Qwen2Tokenizer``, whose class builds its own pipeline
    (NFC, Qwen's split pattern, byte level) around the file's vocabulary: the snapshot
    takes the pipeline as loaded, so the copy answers alike."""
    from transformers import Qwen2Tokenizer

    backend = hf_tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    merges = _merges_of(backend)
    qwen = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    qwen.chat_template = hf_tokenizer.chat_template
    qwen.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    copy = copy_of(loaded)
    assert_same_answers(loaded, copy)
    # NFC: a decomposed "é" becomes the composed one in both
    decomposed = "cafe\u0301"
    assert copy(decomposed)["input_ids"] == loaded(decomposed)["input_ids"] == loaded("caf\u00e9")["input_ids"]
    for chat in CHATS:
        expected = loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert copy.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected


def _merges_of(backend) -> list[tuple[str, str]]:
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in merges]


def test_decode_cleans_up_spaces_where_the_tokenizer_does():
    """A WordPiece tokenizer configured to clean up spaces before punctuation decodes the
    same through the copy (BPE tokenizers never clean up, whatever their setting)."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(cleanup=False)  # the clean-up under test is transformers'
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]", "[SEP]"], show_progress=False)
    backend.train_from_iterator(_training_corpus()[:500], trainer=trainer)
    for clean_up in (True, False):
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", clean_up_tokenization_spaces=clean_up
        )
        copy = copy_of(hf_tokenizer)
        for text in ("don't stop , they 're here . isn't it ? yes !", "one , two ."):
            ids = hf_tokenizer(text)["input_ids"]
            assert copy(text)["input_ids"] == ids
            assert copy.decode(ids) == hf_tokenizer.decode(ids)
        assert (" ," in copy.decode(hf_tokenizer("one , two .")["input_ids"])) is not clean_up


def test_only_tokenizers_computing_what_the_copy_computes_are_snapshotted(hf_tokenizer, tiny_model_dir):
    """A class that replaces any method the copy reproduces, and anything that is not a
    fast tokenizer, gives ``None`` (the prep process then loads the tokenizer itself)."""

    class OwnDecode(type(hf_tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return "changed"

    class OwnTemplate(type(hf_tokenizer)):
        def apply_chat_template(self, conversation, **kwargs):
            return "changed"

    for kind in (OwnDecode, OwnTemplate):
        assert TokenizerSnapshot.of(kind.from_pretrained(tiny_model_dir)) is None
    assert TokenizerSnapshot.of(object()) is None
    assert TokenizerSnapshot.of(hf_tokenizer) is not None


def test_the_snapshot_is_hashable_survives_pickling_and_a_copy_gives_it_back(hf_tokenizer):
    """A copy's snapshot is the one it was built from (the server's tokenizer is a copy,
    and its prep processes get the same snapshot)."""
    snapshot = TokenizerSnapshot.of(hf_tokenizer)
    again = pickle.loads(pickle.dumps(snapshot))
    assert again == snapshot and hash(again) == hash(snapshot)
    assert TokenizerSnapshot.of(TextTokenizer(again)) is again
