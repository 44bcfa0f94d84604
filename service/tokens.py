"""Token ids of request texts: the model tokenizer's own ids, several times sooner for ASCII text.

The model's tokenizer is byte-level BPE behind GPT-2's split of a text into pieces (contractions,
words, numbers, punctuation, spaces). ``tokenizers`` spends most of a text's time on that split,
which keeps every piece's offsets and alignments: on one core a 64-token text took 60 us, 57 of
them splitting. Where the text is ASCII, the split is GPT-2's pattern with its Unicode classes
spelled out in ASCII, which Python's ``re`` runs in ~9 us, and a piece's ids are what the
tokenizer gives that piece alone (BPE never merges across pieces), kept in a bounded table: the
same 64-token text takes ~14 us. Any other text, or a tokenizer configured otherwise, goes to the
tokenizer whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tokenizers import Tokenizer

# GPT-2's pattern as the byte-level pre-tokenizer runs it, for ASCII text: \p{L} is [A-Za-z], \p{N}
# is [0-9], and \s the six ASCII white-space characters (not \x1c-\x1f, which Python's \s includes)
_WS = r"\t\n\x0b\x0c\r "
ASCII_SPLIT = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)

MAX_PIECES = 1 << 15  # pieces whose ids are kept (a few MB at most); the table starts afresh when full
MAX_PIECE_CHARS = 32  # longer pieces (runs of spaces, long numbers) are tokenized each time
# Pieces a text may add to the table. The tokenizer takes ~4 us a call even for one piece, so a text
# of pieces not seen before (random words, a flood meant to miss) cost 3x more piece by piece than
# whole (268 against 89 us, 40 random words): a text with more new pieces than this goes to the
# tokenizer whole, having added these (121 against 84 us for such a text; the table fills as texts
# come, a few pieces each).
MAX_NEW_PIECES = 2


def splits_like_gpt2(tok: Tokenizer) -> bool:
    """Whether ``tok`` is byte-level BPE behind GPT-2's split with nothing else before it: the
    configuration under which ``ASCII_SPLIT`` and each piece's own ids give the tokenizer's ids."""
    cfg = json.loads(tok.to_str())
    pre = cfg.get("pre_tokenizer") or {}
    model = cfg.get("model") or {}
    return (
        cfg.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
    )


class TextTokenizer:
    """Texts to token ids, without special tokens, equal to ``tok.encode(text, add_special_tokens=False)``.

    Safe to call from several threads: the table's reads and writes are single dict operations."""

    def __init__(self, tok: Tokenizer, max_pieces: int = MAX_PIECES) -> None:
        self.tok = tok
        self.max_pieces = max_pieces
        self.fast = splits_like_gpt2(tok)
        # added tokens are matched in the text before any split, except special ones where the
        # tokenizer is told to read them as text (the server's is: see Runtime)
        self.added = [
            t.content for t in tok.get_added_tokens_decoder().values() if not (t.special and tok.encode_special_tokens)
        ]
        self.pieces: dict[str, list[int]] = {}

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        # None: a text for the tokenizer whole (not ASCII, an added token in it, or too much new in it)
        out: list[list[int] | None] = [self._ascii(t) if self._splits(t) else None for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            # encode_batch_fast leaves out the character offsets, which nothing here reads
            done = self.tok.encode_batch_fast([texts[i] for i in rest], add_special_tokens=False)
            for i, e in zip(rest, done, strict=True):
                out[i] = e.ids
        return out  # type: ignore[return-value]  # every None was filled

    def _splits(self, text: str) -> bool:
        return self.fast and text.isascii() and not any(a in text for a in self.added)

    def _ascii(self, text: str) -> list[int] | None:
        ids: list[int] = []
        table = self.pieces
        new = 0
        for piece in ASCII_SPLIT.findall(text):
            got = table.get(piece)
            if got is None:
                new += 1
                if new > MAX_NEW_PIECES:
                    return None
                got = self._piece(piece)
            ids += got
        return ids

    def _piece(self, piece: str) -> list[int]:
        ids = self.tok.encode(piece, add_special_tokens=False).ids
        if len(piece) <= MAX_PIECE_CHARS:
            if len(self.pieces) >= self.max_pieces:
                self.pieces.clear()
            self.pieces[piece] = ids
        return ids
