"""The front end's model card, read in a passing child process (``server.front_card``): the
card the server would read itself, with a tokenizer that answers alike, and a server
process that never imports torch."""

from __future__ import annotations

import dataclasses
import os

import pytest
import trio

from engine.errors import ModelLoadError
from engine.model_loader import load_model_card
from server import front_card
from server.front_card import CardRequest, load_front_card
from tests.helpers.fresh_interpreter import run_fresh
from vl.text_tokenizer import TextTokenizer

CHAT = [{"role": "user", "content": [{"type": "text", "text": "what is in"}, {"type": "image"}]}]


def request_for(directory, **changes) -> CardRequest:
    return dataclasses.replace(CardRequest(str(directory), "auto", "cpu", None), **changes)


async def test_the_card_read_in_a_child_is_the_card_read_here(tiny_model_dir):
    """Every field but the tokenizer (and the time it took) equals ``load_model_card``'s;
    the tokenizer is a ``TextTokenizer`` that encodes, decodes and renders the chat
    template as the loaded one does."""
    card = await load_front_card(request_for(tiny_model_dir, max_model_len=512))
    here = load_model_card(tiny_model_dir, max_model_len=512)
    assert isinstance(card.tokenizer, TextTokenizer)
    skip = {"tokenizer", "load_seconds"}
    for field in dataclasses.fields(here):
        if field.name not in skip:
            assert getattr(card, field.name) == getattr(here, field.name), field.name
    assert card.max_model_len == 512 and card.dtype == "float32" and card.device == "cpu"
    text = "hello there <|image_pad|> émoji 🎉"
    assert (
        card.tokenizer(text, add_special_tokens=False)["input_ids"]
        == here.tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    ids = here.tokenizer(text)["input_ids"]
    assert card.tokenizer.decode(ids) == here.tokenizer.decode(ids) and len(card.tokenizer) == len(here.tokenizer)
    rendered = here.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert card.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == rendered


async def test_a_directory_it_cannot_serve_raises_what_the_card_raises_here(tmp_path):
    with pytest.raises(ModelLoadError) as here:
        load_model_card(tmp_path)
    with pytest.raises(ModelLoadError) as there:
        await load_front_card(request_for(tmp_path))
    assert str(there.value) == str(here.value) and "config.json" in str(there.value)


async def test_a_tokenizer_without_a_snapshot_is_read_here(tiny_model_dir, monkeypatch):
    """Where the child's tokenizer gives no snapshot the server reads the card itself
    (its tokenizer is then transformers' own)."""
    no_snapshot = (
        "import vl.text_tokenizer as t; t.TokenizerSnapshot.of = staticmethod(lambda tokenizer: None); "
        + front_card._CHILD
    )
    monkeypatch.setattr(front_card, "_CHILD", no_snapshot)
    card = await load_front_card(request_for(tiny_model_dir))
    assert not isinstance(card.tokenizer, TextTokenizer)
    assert type(card.tokenizer).__module__.startswith("transformers.")


async def test_a_child_that_fails_otherwise_is_a_model_load_error_with_its_last_words(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(front_card, "_CHILD", "import sys; print('noise'); sys.exit('the child broke')")
    with pytest.raises(ModelLoadError, match="the child broke"):
        await load_front_card(request_for(tiny_model_dir))


async def test_a_cancelled_read_leaves_no_child_behind(tiny_model_dir, monkeypatch, tmp_path):
    """Invariant: cancelling ``load_front_card`` kills its child; nothing is left running."""
    pid_file = tmp_path / "child.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    monkeypatch.setattr(front_card, "_CHILD", sleeper)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(load_front_card, request_for(tiny_model_dir))
        with trio.fail_after(30):
            while not pid_file.exists() or not pid_file.read_text():
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    pid = int(pid_file.read_text())
    with trio.fail_after(10):
        while _alive(pid):
            await trio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # a zombie is gone, not yet reaped


def test_the_front_end_reads_card_and_pixel_settings_without_torch(tiny_model_dir):
    """In a fresh interpreter (as ``vlserve serve`` starts) the card read through the child
    and the image preprocessor leave torch and transformers' config, model and image
    modules unimported in this process, and the preprocessor takes the fast path."""
    script = (
        "import sys, trio\n"
        "from server.front_card import CardRequest, load_front_card\n"
        "from vl.image_pixels import load_image_preprocessor\n"
        f"card = trio.run(load_front_card, CardRequest({str(tiny_model_dir)!r}, 'auto', 'cpu', None))\n"
        "preprocessor = load_image_preprocessor(card.path, card.spatial_merge_size)\n"
        "heavy = ('torch', 'transformers.configuration_utils', 'transformers.modeling_utils',"
        " 'transformers.image_processing_utils')\n"
        "print([m for m in heavy if m in sys.modules], preprocessor.pixel_settings is not None,"
        " len(card.tokenizer('hello')['input_ids']) > 0)\n"
    )
    assert run_fresh(script).decode().split("\n")[-2] == "[] True True"
