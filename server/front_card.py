"""The model's card for the server's front end, read in a passing process so the server
never imports torch.

With the engine in its worker process the server runs no model: it needs the model's
``ModelCard`` (tokenizer, limits, stop ids, merge size). Reading it takes transformers'
``AutoTokenizer`` and ``AutoConfig``, and with torch installed those import torch
(transformers' ``configuration_utils`` imports ``modeling_rope_utils``, which imports it):
~140 MiB of private memory kept for the server's life, for nothing it uses.
``load_front_card`` runs ``engine.model_loader.load_model_card`` in a child interpreter
instead, which sends back the card's plain fields and a ``TokenizerSnapshot`` of its
tokenizer (``vl/text_tokenizer.py``) and exits; the server rebuilds the tokenizer as a
``TextTokenizer``. Where the tokenizer gives no snapshot (a class that replaces one of the
methods the copy reproduces), the card is read in the server as before.

The child is a plain subprocess (not multiprocessing), so this works in daemonic
processes too (hypercorn's own workers).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from collections.abc import Callable

import trio

from engine.errors import ModelLoadError
from engine.model_card import ModelCard
from vl.text_tokenizer import TextTokenizer, TokenizerSnapshot

_CHILD = "from server.front_card import child_main; child_main()"


@dataclasses.dataclass(frozen=True)
class CardRequest:
    """What to read: ``engine.model_loader.load_model_card``'s arguments; ``path`` ``None``
    is the built-in tiny model."""

    path: str | None
    dtype: str
    device: str
    max_model_len: int | None

    def model_dir(self) -> str:
        """``path``, or the built-in tiny model's directory (built there first if missing)."""
        if self.path:
            return self.path
        from engine.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())


async def load_front_card(request: CardRequest, progress: Callable[[str], None] = lambda stage: None) -> ModelCard:
    """The ``ModelCard`` of ``request.path``, read in a child interpreter, with a
    ``TextTokenizer`` for its tokenizer; read in a thread of this process instead where
    the tokenizer gives no snapshot. Raises ``ModelLoadError`` as ``load_model_card``
    does (also when the child fails otherwise: its last output says why).
    Cancellation: the child is killed (a read in a thread finishes first)."""
    progress("tokenizer")
    result = await trio.run_process(
        [sys.executable, "-c", _CHILD],
        stdin=pickle.dumps(request),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise ModelLoadError(f"reading the model's card failed: {' / '.join(tail) or f'exit {result.returncode}'}")
    outcome = pickle.loads(result.stdout)
    if isinstance(outcome, ModelLoadError):
        raise outcome
    card, snapshot = outcome
    if snapshot is None:
        return await trio.to_thread.run_sync(_read_here, request)
    return dataclasses.replace(card, tokenizer=TextTokenizer(snapshot))


def _read_here(request: CardRequest) -> ModelCard:
    from engine.model_loader import load_model_card

    return load_model_card(
        request.model_dir(), dtype=request.dtype, device=request.device, max_model_len=request.max_model_len
    )


def child_main() -> None:
    """The child: read a ``CardRequest`` from stdin, write the pickled outcome to stdout:
    ``(card without its tokenizer, snapshot or None)``, or the ``ModelLoadError``. Any
    other failure is a traceback on stderr and a non-zero exit. Whatever loading prints
    goes to stderr: stdout carries the outcome alone."""
    request = pickle.loads(sys.stdin.buffer.read())
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        card = _read_here(request)
    except ModelLoadError as error:
        outcome: object = error
    else:
        outcome = (dataclasses.replace(card, tokenizer=None), TokenizerSnapshot.of(card.tokenizer))
    with out:
        out.write(pickle.dumps(outcome))
