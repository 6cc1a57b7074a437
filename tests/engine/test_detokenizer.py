from engine.detokenizer import IncrementalDetokenizer


def feed(tokenizer, text, stop):
    ids = tokenizer.encode(text).ids
    d = IncrementalDetokenizer(tokenizer, stop)
    released, stopped = [], False
    for i in ids:
        if d.add(i):
            stopped = True
            break
        released.append(d.release(final=False))
    released.append(d.release(final=True))
    return released, stopped


def test_stop_string_split_across_tokens_is_held_back(tiny_model):
    tok = tiny_model.tokenizer.backend_tokenizer
    released, stopped = feed(tok, "hello world please answer", ("ld ple",))
    assert stopped
    assert "".join(released) == "hello wor"
    assert all("ld" not in r for r in released)


def test_no_stop_releases_everything_and_utf8_whole(tiny_model):
    tok = tiny_model.tokenizer.backend_tokenizer
    released, stopped = feed(tok, "ünïcode 😀 ok", ())
    assert not stopped
    assert "".join(released) == "ünïcode 😀 ok"
    assert all("\ufffd" not in r for r in released)


def test_unknown_ids_decode_to_nothing(tiny_model):
    tok = tiny_model.tokenizer.backend_tokenizer
    d = IncrementalDetokenizer(tok, ())
    assert d.add(tok.get_vocab_size() + 5) is False
    assert d.release(final=True) == ""


def test_include_stop_keeps_the_stop_string_and_drops_what_follows(tiny_model):
    tok = tiny_model.tokenizer.backend_tokenizer
    d = IncrementalDetokenizer(tok, ("ld ple",), include_stop=True)
    for i in tok.encode("hello world please answer").ids:
        if d.add(i):
            break
    assert d.release(final=True) == "hello world ple"
