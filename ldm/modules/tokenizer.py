"""Byte-level BPE tokenizer for the jointly trained text encoder (paper §3.3, §4.3.1).

The paper's LDM-KL-8 text-to-image model tokenises captions with BERT's tokenizer and trains the
transformer τ_θ from scratch together with the UNet. We have no network access for BERT's vocabulary
and our demo datasets have their own small vocabulary, so the tokenizer is *trained offline on the
dataset's captions* with the `tokenizers` library (the same byte-level BPE as GPT-2 / CLIP): every
byte is in the initial alphabet, so no caption ever maps to an unknown token.

`encode` always returns exactly `max_length` positions (BOS, tokens, EOS, PAD…): the encoder's learned
position table and the UNet's cross-attention both see a fixed number of tokens M.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 (BpeTrainer assigns special tokens first)
FORMAT_VERSION = 1
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte is a token, so no caption is ever <unk>


def _check_captions(captions, where: str) -> list[str]:
    # A bare string is iterable too: it would silently become one "caption" per character.
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"{where}: expected a list[str] of captions, got {type(captions).__name__} "
                        f"{captions!r:.80}")
    return list(captions)


class BPETokenizer:
    """Byte-level BPE with `<pad>`=0, `<bos>`=1, `<eos>`=2, trained on a caption corpus."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"BPETokenizer: the wrapped tokenizer lacks special tokens {SPECIAL_TOKENS}")
        self.pad_id, self.bos_id, self.eos_id = ids

    # ---------------------------------------------------------------- training / serialisation
    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, lowercase: bool = True,
              min_frequency: int = 2) -> "BPETokenizer":
        """Learn BPE merges from `captions` until the vocabulary (incl. 256 bytes + 3 specials) has
        at most `vocab_size` entries. Deterministic for a given caption list, so every rank of a
        distributed run that fits on the same captions gets the same tokenizer."""
        captions = _check_captions(list(captions), "BPETokenizer.train")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"BPETokenizer.train: vocab_size={vocab_size} is below the byte alphabet "
                             f"plus special tokens ({MIN_VOCAB_SIZE})")
        tok = Tokenizer(models.BPE())
        # NFKC folds look-alike unicode; lowercase mirrors the paper's uncased BERT tokenizer.
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(norms)
        # add_prefix_space: "red" at the start of a caption and after a space get the same token.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                      show_progress=False)
        tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
        return cls(tok)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, "tokenizer": json.loads(self._tokenizer.to_str())})

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"BPETokenizer.from_json: unknown format {data.get('format')!r} "
                             f"(this code reads format {FORMAT_VERSION})")
        return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])))

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (ids LongTensor (B, max_length), mask BoolTensor (B, max_length)).

        Each row is `<bos> tokens <eos> <pad>…`; mask is True on BOS..EOS. An empty caption is
        `<bos> <eos>`. Captions with more than `max_length - 2` tokens are cut (EOS is kept) and ONE
        warning per call says how many tokens were dropped.
        """
        captions = _check_captions(captions, "BPETokenizer.encode")
        if max_length < 2:
            raise ValueError(f"BPETokenizer.encode: max_length={max_length} leaves no room for BOS+EOS")
        body = max_length - 2
        ids = torch.full((len(captions), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), max_length), dtype=torch.bool)
        dropped = []
        for row, enc in enumerate(self._tokenizer.encode_batch(captions, add_special_tokens=False)):
            tokens = enc.ids
            if len(tokens) > body:
                dropped.append(len(tokens) - body)
                tokens = tokens[:body]
            seq = [self.bos_id, *tokens, self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        if dropped:
            warn_truncation(dropped, max_length, "BPETokenizer.encode")
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Token ids (one row, specials and padding allowed) -> text (normalised: e.g. lowercased)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True).strip()


def warn_truncation(dropped: list[int], max_length: int, where: str) -> None:
    """One warning for a whole batch: per-caption warnings would flood a training log."""
    warnings.warn(f"{where}: {len(dropped)} caption(s) longer than max_length={max_length} were "
                  f"truncated, dropping {sum(dropped)} token(s) in total (at most {max(dropped)} "
                  f"from one caption)", stacklevel=3)
