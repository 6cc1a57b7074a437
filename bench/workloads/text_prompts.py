"""Synthetic chat prompts of varied length: deterministic word salad with a question.

With the defaults and the tiny model's tokenizer a rendered prompt has about 55 to 370
tokens (mean about 200): chat-sized, and shorter than an image request's 256 image tokens.

Prompt ``i`` has between ``min_words`` and ``max_words`` words, spread evenly over the
range by a fixed permutation, so any run of consecutive indices mixes short and long ones.
"""

from __future__ import annotations

import random

_WORDS = (
    "the a of in on with and or is are was shows describe what where why how which "
    "cat dog bird tree house car road sky sun cloud river mountain city street window door "
    "red green blue yellow white black small large old new bright dark left right top bottom "
    "center corner picture photo image scene person people table chair book light shadow water "
    "answer question explain summarise compare list count colour shape circle square line "
    "morning evening night winter summer spring autumn rain snow wind field forest garden"
).split()
_QUESTIONS = (
    "What is happening here?",
    "Summarise this in one sentence.",
    "Which colours appear most often?",
    "Describe the scene in detail.",
    "List the objects you can see.",
)


def text_prompt(index: int, *, min_words: int = 8, max_words: int = 128) -> str:
    """Prompt number ``index``: the same text on every run."""
    if not 1 <= min_words <= max_words:
        raise ValueError("need 1 <= min_words <= max_words")
    rng = random.Random(index)
    span = max_words - min_words + 1
    n = min_words + (index * 7919) % span  # 7919 is prime: consecutive indices spread out
    words = " ".join(rng.choice(_WORDS) for _ in range(n))
    return f"{words}. {_QUESTIONS[index % len(_QUESTIONS)]}"


def image_question(index: int) -> str:
    """A short question to send beside an image."""
    return f"{_QUESTIONS[index % len(_QUESTIONS)]} (image {index})"
