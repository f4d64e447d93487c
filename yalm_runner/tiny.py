"""Tiny random YaLM checkpoints in the release layout, for tests, benchmarks and the demo.

The weights are random but deterministic from a seed; the vocabulary is either a given ``.sp``
file (the real YaLM one, say) or a small SentencePiece BPE model trained here on a generated
Russian/English market corpus with YaLM's special pieces at YaLM's ids. The result goes through
the same converter as the real release.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from yalm_runner.config import ModelConfig
from yalm_runner.errors import ConfigError
from yalm_runner.model import expected_shapes
from yalm_runner.release import (
    HEADS_RECORD,
    SPLIT_DIMS,
    VOCAB_DIR,
    VOCAB_NAME,
    WEIGHTS_DIR,
    release_file_name,
    save_release_file,
    slots_for_parts,
)

# YaLM's user-defined pieces, in its order (ids 3..7 after <unk>, <s>, </s>).
USER_PIECES = ["[NL]", "[SEP]", "[MASK]", "[CLS]", "[ZTAB]"]

_EN_SUBJECTS = [
    "The company",
    "Apple",
    "Nvidia",
    "The central bank",
    "Gazprom",
    "Sberbank",
    "Oil prices",
    "The index",
    "Investors",
    "Analysts",
    "The market",
    "Yandex",
]
_EN_VERBS = [
    "rose",
    "fell",
    "reported",
    "expects",
    "raised",
    "cut",
    "held",
    "announced",
    "beat",
    "missed",
]
_EN_OBJECTS = [
    "quarterly revenue",
    "its dividend forecast",
    "the key rate",
    "earnings per share",
    "guidance for the year",
    "net profit",
    "shares by 3 percent",
    "export volumes",
    "the price target",
    "bond yields",
]
_RU_SUBJECTS = [
    "Сбербанк",
    "Газпром",
    "Лукойл",
    "Банк России",
    "Индекс Мосбиржи",
    "Инвесторы",
    "Аналитики",
    "Рубль",
    "Нефть Brent",
    "Яндекс",
    "Компания",
]
_RU_VERBS = [
    "повысил",
    "снизил",
    "сохранил",
    "объявил",
    "ожидает",
    "укрепился",
    "подешевела",
    "отчитался о",
    "пересмотрел",
]
_RU_OBJECTS = [
    "ключевую ставку",
    "прогноз по дивидендам",
    "чистую прибыль",
    "выручку за квартал",
    "объём добычи",
    "целевую цену акций",
    "доходность облигаций",
    "курс доллара",
]


def training_corpus(num_sentences: int = 4000, seed: int = 0) -> list[str]:
    """A deterministic bilingual corpus of market sentences for the tiny vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        if rng.random() < 0.5:
            words = [rng.choice(_EN_SUBJECTS), rng.choice(_EN_VERBS), rng.choice(_EN_OBJECTS)]
        else:
            words = [rng.choice(_RU_SUBJECTS), rng.choice(_RU_VERBS), rng.choice(_RU_OBJECTS)]
        number = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
        lines.append(f"{' '.join(words)} ({number}){rng.choice(['.', '!', '?', ';', ','])}")
    return lines


def train_vocabulary(vocab_size: int = 1000) -> bytes:
    """A small SentencePiece BPE model with YaLM's conventions (docs/yalm.md §Tokenizer)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=USER_PIECES,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


@dataclass(frozen=True)
class TinySpec:
    """The shape and seed of a tiny model; vocab_size is taken from the vocabulary."""

    num_layers: int = 2
    embedding_size: int = 32
    hidden_size: int = 64
    num_heads: int = 4
    ffn_size: int = 172
    max_positions: int = 1024
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16
    tensor_parallel: int = 1
    # The word embeddings' spread. They are the head's output matrix too (tied), while the
    # input side is layer-normed: a small value flattens the next-token distributions alone
    # (a near tie at every step, as exact-resume tests need) and changes nothing else.
    embedding_std: float = 1.0


def _random_tensor(
    name: str, shape: tuple[int, ...], generator: torch.Generator, embedding_std: float = 1.0
) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=generator)
    fan_in = shape[1]
    scale = embedding_std if name == "word_embeddings.weight" else fan_in**-0.5
    return scale * torch.randn(shape, generator=generator)


def _shard(name: str, tensor: torch.Tensor, ranks: int, rank: int) -> torch.Tensor:
    dim = SPLIT_DIMS.get(name)
    if dim is None or ranks == 1:
        return tensor
    return tensor.chunk(ranks, dim=dim)[rank].clone()


def make_tiny(
    dst: str | Path,
    spec: TinySpec = TinySpec(),
    vocab: str | Path | None = None,
    vocab_size: int = 1000,
) -> ModelConfig:
    """Write a random YaLM checkpoint in the release layout to ``dst``; returns its shape."""
    dst = Path(dst)
    if (dst / WEIGHTS_DIR).exists():
        raise ConfigError(f"{dst / WEIGHTS_DIR} already exists; pick an empty folder")
    (dst / WEIGHTS_DIR).mkdir(parents=True)
    (dst / VOCAB_DIR).mkdir(parents=True, exist_ok=True)
    vocab_target = dst / VOCAB_DIR / VOCAB_NAME
    if vocab is None:
        vocab_target.write_bytes(train_vocabulary(vocab_size))
    else:
        shutil.copyfile(vocab, vocab_target)
    processor = spm.SentencePieceProcessor(model_file=str(vocab_target))
    ffn_size = spec.ffn_size
    if ffn_size % spec.tensor_parallel:
        # Megatron zero-pads the FFN to a multiple of the rank count; the padding is exact.
        ffn_size += spec.tensor_parallel - ffn_size % spec.tensor_parallel
    config = ModelConfig(
        vocab_size=processor.GetPieceSize(),
        embedding_size=spec.embedding_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        ffn_size=spec.ffn_size,
        max_positions=spec.max_positions,
    )
    # The released checkpoint does not say how many heads it has; ours does, so that
    # ``convert`` needs no --num-heads for it (and cannot silently assume YaLM-100B's 128).
    (dst / HEADS_RECORD).write_text(json.dumps({"num_heads": config.num_heads}) + "\n")
    generator = torch.Generator().manual_seed(spec.seed)
    slot_names = {
        0: ["word_embeddings.weight"],
        1: ["input_layernorm.weight", "input_layernorm.bias"],
    }
    for part, slots in slots_for_parts(config.num_layers).items():
        shapes = expected_shapes(config, part)
        for slot in slots:
            names = slot_names.get(slot, list(shapes))
            full = {
                name: _random_tensor(name, shapes[name], generator, spec.embedding_std)
                for name in names
            }
            full = {name: _pad_ffn(name, tensor, ffn_size) for name, tensor in full.items()}
            for rank in range(spec.tensor_parallel):
                shard = {
                    name: _shard(name, tensor, spec.tensor_parallel, rank).to(spec.dtype)
                    for name, tensor in full.items()
                }
                save_release_file(dst / WEIGHTS_DIR / release_file_name(slot, rank), shard)
    return config


def _pad_ffn(name: str, tensor: torch.Tensor, ffn_size: int) -> torch.Tensor:
    if name.startswith("mlp.dense_ffn_hidden") or name.startswith("mlp.dense_ffn_gate"):
        missing = ffn_size - tensor.shape[0]
        return (
            torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])
            if missing
            else tensor
        )
    if name == "mlp.dense_ffn_output.weight":
        missing = ffn_size - tensor.shape[1]
        return (
            torch.cat([tensor, tensor.new_zeros((tensor.shape[0], missing))], dim=1)
            if missing
            else tensor
        )
    return tensor
