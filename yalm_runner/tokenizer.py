"""Text <-> token ids with YaLM's conventions (docs/yalm.md §Tokenizer).

YaLM's SentencePiece model has no newline piece; the original code replaces ``\\n`` with the
user-defined piece ``[NL]`` before encoding and maps it back after decoding. BOS (id 1) is
prepended by hand; EOS (id 2) ends a generation and decodes to nothing.

This module owns only the mapping. It does not know about models, batches or files other than
the ``.sp`` model it is given.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from yalm_runner.errors import ConfigError

NEWLINE_PIECE = "[NL]"
UNK_ID = 0
BOS_ID = 1
EOS_ID = 2


class Tokenizer:
    """A YaLM tokenizer around one SentencePiece model file."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ConfigError(f"tokenizer model not found: {self.path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"not a SentencePiece model: {self.path} ({exc})") from exc
        self.vocab_size: int = self._sp.GetPieceSize()
        self.newline_id = self._sp.PieceToId(NEWLINE_PIECE)
        bos, eos = self._sp.IdToPiece(BOS_ID), self._sp.IdToPiece(EOS_ID)
        if (bos, eos) != ("<s>", "</s>"):
            raise ConfigError(
                f"{self.path}: expected <s>=1 and </s>=2 as in YaLM's vocabulary, "
                f"got {bos!r}=1 and {eos!r}=2"
            )
        if self._sp.IdToPiece(self.newline_id) != NEWLINE_PIECE:
            raise ConfigError(f"{self.path}: vocabulary has no {NEWLINE_PIECE} piece")

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Ids of ``text`` as the original generator builds a prompt: ``[1] + sp(text')``."""
        ids = self._sp.EncodeAsIds(text.replace("\n", NEWLINE_PIECE)) if text else []
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; control tokens (BOS, EOS) decode to nothing, ``[NL]`` to a newline."""
        return self._sp.DecodeIds([int(token) for token in ids]).replace(NEWLINE_PIECE, "\n")

    def continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The text that ``new_ids`` add after ``prompt_ids``.

        The original slices ``decode(all)[len(prompt_text):]``, which cuts in the wrong place
        when NFKC normalisation changed the prompt's length (``…`` -> ``...``; docs/yalm.md,
        pitfall: tokenizer-pitfall). Decoding the prompt ids instead of using the raw prompt
        text keeps the cut at the token boundary, and decoding both together keeps
        SentencePiece's word-boundary spaces and multi-token byte sequences intact.
        """
        full = self.decode([*prompt_ids, *new_ids])
        head = self.decode(list(prompt_ids))
        if full.startswith(head):
            return full[len(head) :]
        # A byte-fallback character split across the boundary: the prompt alone decodes its
        # dangling bytes as U+FFFD. Find the longest common prefix instead.
        common = 0
        for left, right in zip(head, full, strict=False):
            if left != right:
                break
            common += 1
        return full[common:]
