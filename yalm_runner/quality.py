"""The quality guard: how far a candidate store's predictions are from a reference store's.

For every position of every prompt it compares the next-token logits of the two stores (the
relative error ``||cand - ref|| / ||ref||`` over all positions, the mean KL divergence of the
next-token distributions, and how often their top-1 tokens agree), and on a supplied text it
measures both stores' perplexity. The usual use: the 16-bit store as the reference and an int8
or int4 store of the same release as the candidate, so that someone with the real weights can
decide whether compression costs too much.

Decoding is compared too: after each prompt, ``new_tokens`` steps of the reference's greedy
continuation are fed to both (teacher forcing), the candidate's KV cache kept at ``kv_bits``
exactly as the engine's pinned-RAM cache keeps it: the slots a pass writes are exact within
that pass and compressed for every later one. So the cost of an 8- or 4-bit KV cache (and of
compressed weights while decoding) is measured on the same path.

Answers are compared too (``signals``: prefixes with candidate answers, ``yalm-runner score``'s
input): both stores score them with the scorer the pipeline uses, and the report says how often
the candidate picks the same top answer as the reference and how far its answer probabilities
move. For a trading robot that reads the top answer, that agreement is a better guard than the
logit error.

The stores are run one after the other (the reference's logits wait on the CPU), so only one
model is loaded at a time. Each sequence runs alone from position 0, the same math as the
engine's prefill. This module reads prompt and text files; it does not generate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from yalm_runner import model
from yalm_runner.checkpoint import ModelStore
from yalm_runner.engine import Engine
from yalm_runner.errors import ConfigError
from yalm_runner.kvformat import KV_BITS, decode_kv, encode_kv
from yalm_runner.offload import QuantizedResidentWeights, ResidentWeights, WeightSource
from yalm_runner.runner import read_prompts
from yalm_runner.scorefile import read_score_rows
from yalm_runner.scoring import ScoreRow, ScoringJob
from yalm_runner.tokenizer import Tokenizer


@dataclass(frozen=True)
class QualityReport:
    """The figures of one reference/candidate comparison."""

    reference: str
    candidate: str
    reference_quantization: str
    candidate_quantization: str
    prompts: int
    positions: int
    relative_logit_error: float  # ||cand - ref|| / ||ref|| over every compared position
    worst_position_relative_error: float
    top1_agreement: float  # fraction of positions whose argmax tokens agree
    mean_kl_nats: float  # mean KL(ref || cand) of the next-token distributions
    candidate_kv_bits: int
    decode_positions: int  # decode steps compared (the figures below are over them alone)
    decode_relative_logit_error: float
    decode_top1_agreement: float
    decode_mean_kl_nats: float
    text_tokens: int
    reference_perplexity: float | None
    candidate_perplexity: float | None
    signal_prompts: int = 0  # prefixes with candidate answers compared
    signal_top_agreement: float | None = None  # fraction picking the same top answer
    signal_mean_probability_shift: float | None = None  # mean |p_cand - p_ref| over answers
    signal_worst_probability_shift: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        rows = [
            ("reference", f"{self.reference} ({self.reference_quantization})"),
            ("candidate", f"{self.candidate} ({self.candidate_quantization})"),
            ("prompts / positions", f"{self.prompts} / {self.positions}"),
            ("relative logit error", f"{self.relative_logit_error:.5f}"),
            ("worst position", f"{self.worst_position_relative_error:.5f}"),
            ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%"),
            ("mean KL (nats)", f"{self.mean_kl_nats:.6f}"),
        ]
        if self.decode_positions:
            rows += [
                ("decode steps", f"{self.decode_positions} (candidate KV "
                 f"{self.candidate_kv_bits}-bit)"),
                ("decode logit error", f"{self.decode_relative_logit_error:.5f}"),
                ("decode top-1 agreement", f"{100 * self.decode_top1_agreement:.2f}%"),
                ("decode mean KL (nats)", f"{self.decode_mean_kl_nats:.6f}"),
            ]  # fmt: skip
        if self.signal_prompts:
            rows += [
                ("signal prompts", str(self.signal_prompts)),
                ("top-answer agreement", f"{100 * self.signal_top_agreement:.2f}%"),
                ("answer probability shift", f"mean {self.signal_mean_probability_shift:.4f}, "
                 f"worst {self.signal_worst_probability_shift:.4f}"),
            ]  # fmt: skip
        if self.reference_perplexity is not None and self.candidate_perplexity is not None:
            ratio = self.candidate_perplexity / self.reference_perplexity
            rows += [
                ("text tokens", str(self.text_tokens)),
                ("perplexity reference", f"{self.reference_perplexity:.4f}"),
                ("perplexity candidate", f"{self.candidate_perplexity:.4f} ({ratio:.4f}x)"),
            ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@contextmanager
def resident_weights(
    store: ModelStore, device: torch.device, dtype: torch.dtype, verify: bool = True
) -> Iterator[WeightSource]:
    """The store's weights resident on ``device``, compressed or not; released on exit."""
    if store.quantization is not None:
        yield QuantizedResidentWeights(store, device, dtype, verify=verify)
    else:
        yield ResidentWeights(store, device, dtype, verify=verify)


def _forward(
    weights: WeightSource,
    rotary: model.Rotary,
    tokens: list[int],
    start: int,
    valid: torch.Tensor,
    cache: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    kv_bits: int = 16,
) -> torch.Tensor:
    """One pass of one sequence's ``tokens`` at slots ``start ..``: the final hidden states
    (T, H). ``valid`` (1, S) marks the slots written so far; ``cache(layer_idx)`` is the layer's
    keys and values. Below 16 ``kv_bits``, the slots the pass wrote are then kept compressed,
    as the engine's pinned-RAM cache keeps them between passes."""
    config, device = weights.config, weights.device
    end = start + len(tokens)
    valid[:, start:end] = True
    positions = torch.arange(start, end, device=device)[None]  # (1, T)
    mask = model.attention_mask(valid[:, :end], start, len(tokens))
    h = model.embed(torch.tensor([tokens], device=device), weights.embedding(), config)
    for layer_idx, layer in weights.layers():
        keys, values = cache(layer_idx)
        h = model.block(h, layer, config, rotary, positions, keys, values, start, mask)
        if kv_bits != 16:
            for written in (keys[:, start:end], values[:, start:end]):
                decode_kv(encode_kv(written, kv_bits), kv_bits, written)
    return h[0]


def _logits(weights: WeightSource, h: torch.Tensor) -> torch.Tensor:
    embedding = weights.embedding()["word_embeddings.weight"]
    return model.head(h, weights.head(), embedding, weights.config)


@torch.inference_mode()
def sequence_logits(weights: WeightSource, ids: list[int]) -> torch.Tensor:
    """fp32 next-token logits (T, V) at every position of ``ids``, on the CPU."""
    config, device, dtype = weights.config, weights.device, weights.dtype
    shape = (1, len(ids), config.num_heads, config.head_dim)
    valid = torch.zeros(1, len(ids), dtype=torch.bool, device=device)

    def fresh(layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.empty(shape, device=device, dtype=dtype) for _ in range(2))

    rotary = model.Rotary.build(config, device, dtype)
    return _logits(weights, _forward(weights, rotary, ids, 0, valid, fresh)).cpu()


@torch.inference_mode()
def decode_logits(
    weights: WeightSource,
    ids: list[int],
    new_tokens: int,
    kv_bits: int = 16,
    continuation: list[int] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """fp32 logits (new_tokens, V) of ``new_tokens`` decode steps after ``ids``, on the CPU,
    and the tokens fed: ``continuation`` (teacher forcing) or, without it, the greedy choice.

    The KV cache holds each pass's slots exactly during that pass; before the next pass they
    go through ``kv_bits`` compression, as the engine's pinned-RAM cache does between steps.
    """
    config, device, dtype = weights.config, weights.device, weights.dtype
    if new_tokens == 0:
        return torch.empty(0, config.vocab_size), []
    total = len(ids) + new_tokens
    shape = (1, total, config.num_heads, config.head_dim)
    caches = [
        tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        for _ in range(config.num_layers)
    ]
    valid = torch.zeros(1, total, dtype=torch.bool, device=device)
    rotary = model.Rotary.build(config, device, dtype)

    def forward(tokens: list[int], start: int) -> torch.Tensor:
        h = _forward(weights, rotary, tokens, start, valid, caches.__getitem__, kv_bits)
        return _logits(weights, h[-1:])

    logits, fed = [forward(ids, 0)], []
    for step in range(new_tokens - 1):
        token = continuation[step] if continuation else int(logits[-1][0].argmax())
        fed.append(token)
        logits.append(forward([token], len(ids) + step))
    fed.append(continuation[new_tokens - 1] if continuation else int(logits[-1][0].argmax()))
    return torch.cat(logits).float().cpu(), fed


def text_windows(ids: list[int], bos_id: int, window: int) -> list[list[int]]:
    """BOS + consecutive slices of ``ids`` (BOS excluded) of at most ``window`` tokens."""
    body = ids[1:] if ids and ids[0] == bos_id else ids
    step = window - 1
    return [[bos_id, *body[start : start + step]] for start in range(0, len(body), step)]


def _negative_log_likelihood(logits: torch.Tensor, ids: list[int]) -> float:
    """Summed NLL of ids[1:] under the logits of the positions before them."""
    targets = torch.tensor(ids[1:])
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    return float(-log_probs.gather(1, targets[:, None]).sum())


def _read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a JSONL file with a ``prefix`` per line (``generate``'s input format)."""
    return [row["prefix"] for row in read_prompts(path)]


def compare_stores(
    reference_path: str | Path,
    candidate_path: str | Path,
    prompts: list[str],
    text: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    kv_bits: int = 16,
    new_tokens: int = 0,
    signals: list[ScoreRow] | None = None,
) -> QualityReport:
    """Compare the candidate store's predictions with the reference store's: at every prompt
    position, over ``new_tokens`` decode steps with the candidate's KV cache at ``kv_bits``
    (the candidate may be the reference store itself, to judge the KV cache), and on the
    answers of ``signals`` (top answer, answer probabilities)."""
    if kv_bits not in KV_BITS:
        raise ConfigError(f"KV bits must be one of {KV_BITS}, got {kv_bits}")
    reference, candidate = ModelStore.open(reference_path), ModelStore.open(candidate_path)
    if reference.config != candidate.config:
        raise ConfigError(
            f"{candidate.path} is a different model from {reference.path} "
            f"({candidate.config} vs {reference.config})"
        )
    if reference.manifest["tokenizer"]["sha256"] != candidate.manifest["tokenizer"]["sha256"]:
        raise ConfigError(f"{candidate.path} and {reference.path} have different tokenizers")
    device = torch.device(device)
    tokenizer = Tokenizer(reference.tokenizer_path)
    limit = reference.config.max_positions
    if new_tokens >= limit:
        raise ConfigError(f"{new_tokens} decode steps leave no room in {limit} positions")
    prompt_ids = [tokenizer.encode(prompt)[: limit - new_tokens] for prompt in prompts]
    windows = text_windows(tokenizer.encode(text), tokenizer.bos_id, limit) if text else []
    windows = [window for window in windows if len(window) > 1]
    if text is not None and not windows:
        raise ConfigError("the perplexity text has no tokens")

    def run(store: ModelStore, bits: int, continuations: list[list[int]] | None):
        with resident_weights(store, device, dtype, verify) as weights:
            logits = [sequence_logits(weights, ids) for ids in prompt_ids]
            decoded = [
                decode_logits(
                    weights, ids, new_tokens, bits, continuations[n] if continuations else None
                )
                for n, ids in enumerate(prompt_ids)
            ]
            nll = sum(
                _negative_log_likelihood(sequence_logits(weights, ids), ids) for ids in windows
            )
            answers = _answer_probabilities(weights, scoring)
        return logits, decoded, nll, answers

    scoring = ScoringJob(signals or [], tokenizer, reference.config)
    rejected = scoring.admit()
    if rejected:
        raise ConfigError(f"signal row {rejected[0][0]}: {rejected[0][1]}")
    ref_logits, ref_decoded, ref_nll, ref_answers = run(reference, 16, None)
    continuations = [fed for _, fed in ref_decoded]
    cand_logits, cand_decoded, cand_nll, cand_answers = run(candidate, kv_bits, continuations)
    agreement_top, shift_mean, shift_worst = _compare_answers(ref_answers, cand_answers)
    error, worst, agreement, kl, positions = _compare(ref_logits, cand_logits)
    decode = _compare([r for r, _ in ref_decoded], [c for c, _ in cand_decoded])
    text_tokens = sum(len(window) - 1 for window in windows)
    return QualityReport(
        reference=str(reference.path),
        candidate=str(candidate.path),
        reference_quantization=_describe(reference),
        candidate_quantization=_describe(candidate),
        prompts=len(prompt_ids),
        positions=positions,
        relative_logit_error=error,
        worst_position_relative_error=worst,
        top1_agreement=agreement,
        mean_kl_nats=kl,
        candidate_kv_bits=kv_bits,
        decode_positions=decode[4],
        decode_relative_logit_error=decode[0],
        decode_top1_agreement=decode[2],
        decode_mean_kl_nats=decode[3],
        text_tokens=text_tokens,
        reference_perplexity=math.exp(ref_nll / text_tokens) if text_tokens else None,
        candidate_perplexity=math.exp(cand_nll / text_tokens) if text_tokens else None,
        signal_prompts=len(ref_answers),
        signal_top_agreement=agreement_top,
        signal_mean_probability_shift=shift_mean,
        signal_worst_probability_shift=shift_worst,
    )


def _answer_probabilities(weights: WeightSource, job: ScoringJob) -> list[torch.Tensor]:
    """Each signal row's answer probabilities (softmax of the summed log-likelihoods), scored
    by the engine's scorer as the pipeline scores them."""
    if not len(job):
        return []
    scored = Engine(weights).score(job.requests, batch_size=len(job))
    return [torch.softmax(torch.tensor(row.logprobs, dtype=torch.float64), 0) for row in scored]


def _compare_answers(
    references: list[torch.Tensor], candidates: list[torch.Tensor]
) -> tuple[float | None, float | None, float | None]:
    """Top-answer agreement, mean and worst absolute probability shift (None: no rows)."""
    if not references:
        return None, None, None
    agree = sum(int(ref.argmax() == cand.argmax()) for ref, cand in zip(references, candidates,
                                                                        strict=True))  # fmt: skip
    shifts = torch.cat([(cand - ref).abs() for ref, cand in zip(references, candidates,
                                                                strict=True)])  # fmt: skip
    return agree / len(references), float(shifts.mean()), float(shifts.max())


def _compare(
    references: list[torch.Tensor], candidates: list[torch.Tensor]
) -> tuple[float, float, float, float, int]:
    """Relative logit error, worst position's, top-1 agreement, mean KL, and positions."""
    diff_sq = ref_sq = kl = worst = 0.0
    agree = positions = 0
    for ref, cand in zip(references, candidates, strict=True):
        if not ref.shape[0]:
            continue
        diff_rows = (cand - ref).pow(2).sum(dim=-1)  # (T,)
        ref_rows = ref.pow(2).sum(dim=-1)
        diff_sq += float(diff_rows.sum())
        ref_sq += float(ref_rows.sum())
        worst = max(worst, float((diff_rows / ref_rows).sqrt().max()))
        agree += int((ref.argmax(dim=-1) == cand.argmax(dim=-1)).sum())
        ref_log, cand_log = torch.log_softmax(ref, dim=-1), torch.log_softmax(cand, dim=-1)
        kl += float((ref_log.exp() * (ref_log - cand_log)).sum())
        positions += ref.shape[0]
    if not positions:
        return 0.0, 0.0, 1.0, 0.0, 0
    error = math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0
    return error, worst, agree / positions, kl / positions, positions


def _describe(store: ModelStore) -> str:
    if store.quantization is None:
        return store.manifest["dtype"]
    quantization = store.quantization
    if quantization.scheme == "int4":
        return f"int4 g{quantization.group_size}"
    return quantization.scheme


def compare_files(
    reference_path: Path,
    candidate_path: Path,
    prompts_path: Path,
    text_path: Path | None = None,
    signals_path: Path | None = None,
    **options: object,
) -> QualityReport:
    """``compare_stores`` with the prompts (JSONL), the text and the signal rows (JSONL with
    ``prefix`` and ``candidates``) read from files."""
    prompts = read_prompt_file(prompts_path)
    text = _read_text(text_path, "text") if text_path is not None else None
    signals = (
        [
            ScoreRow(row["__key__"], row["prefix"], tuple(row.get("candidates", [])))
            for row in read_score_rows(signals_path)
        ]
        if signals_path is not None
        else None
    )
    return compare_stores(reference_path, candidate_path, prompts, text, signals=signals,
                          **options)  # type: ignore[arg-type]  # fmt: skip
