"""Caption cleaning: the BLIP `pre_caption` behaviour the reference implementation uses."""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """Lower-case, turn each of ``.!"()*#:;~`` into a space, collapse spaces, strip, keep `max_words`."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
