"""Byte-level BPE tokenizer, built with Hugging Face ``tokenizers``.

Byte-level means every UTF-8 byte has a token of its own before any merge, so any text
round-trips exactly: no unknown token, no normalisation. The tokenizer is trained on the
training split only and saved as ``tokenizer.json``, which the server loads as is. This
module needs no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates documents in training, and ends generation


class Tokenizer:
    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        eot = hf.token_to_id(EOT)
        assert eot is not None, f"tokenizer has no {EOT} token"
        self.eot_id: int = eot

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        assert vocab_size > 257, f"vocab_size must exceed the 256 byte tokens + {EOT}, got {vocab_size}"
        hf = HFTokenizer(models.BPE())
        # GPT-2's pre-tokenizer split (contractions, words, numbers, punctuation, spaces), on bytes
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for, (vocab,) int64; the EOT separator counts 0.

        The byte-level alphabet maps each byte to one character, so a token's byte count is
        the length of its string. Used to turn nats per token into bits per byte.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, i in self.hf.get_vocab().items():
            lengths[i] = 0 if i == self.eot_id else len(tok)
        return lengths
