"""Sampling: the original's filters, and randomness owned by each row."""

import pytest
import torch
import torch.nn.functional as F

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import ConfigError
from yalm_runner.offload import ResidentWeights
from yalm_runner.sampling import FIXED_ONE, filter_logits, fixed_cumsum, sample_next


def original_top_k_logits(logits, top_k=0, top_p=0.0, filter_value=-float("Inf")):
    """The reference repo's filter, transcribed loop for loop (docs/yalm.md §Sampling) to compare
    against."""
    logits = logits.clone()
    if top_k > 0:
        indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
        logits[indices_to_remove] = filter_value
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        for row in range(sorted_indices.size(0)):
            logits[row][sorted_indices[row][sorted_indices_to_remove[row]]] = filter_value
    return logits


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (5, 0.0), (20, 0.5), (0, 0.0), (3, 0.99)])
def test_filters_match_the_original(top_k, top_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(top_k))
    expected = original_top_k_logits(logits, top_k, top_p)
    assert torch.equal(filter_logits(logits, top_k, top_p), expected)


def test_draws_depend_on_seed_key_and_step_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=9)
    first = sample_next(logits, params, ["a", "b", "c"], [0, 4, 2])
    # The same row in another position of another batch draws the same token.
    again = sample_next(logits[[2, 0]], params, ["c", "a"], [2, 0])
    assert again.tolist() == [first[2].item(), first[0].item()]
    other_seed = [
        sample_next(logits, SamplingParams(seed=s), ["a", "b", "c"], [0, 0, 0]).tolist()
        for s in range(6)
    ]
    assert len({tuple(draw) for draw in other_seed}) > 1


def test_draws_never_leave_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]] * 64)
    params = SamplingParams(top_p=0.5, seed=1)
    picks = sample_next(logits, params, [f"row{n}" for n in range(64)], [0] * 64)
    assert set(picks.tolist()) == {0}
    picks = sample_next(
        logits, SamplingParams(top_k=2, top_p=0.0), [str(n) for n in range(64)], [0] * 64
    )
    assert set(picks.tolist()) == {0, 1}


def test_seed_reproducibility_and_batch_independence(tiny_store):
    weights = ResidentWeights(ModelStore.open(tiny_store), "cpu", torch.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    rows = [Request(f"r{n}", (1, 10 + n, 20 + n * 3, 7), 12) for n in range(5)]
    together = Engine(weights).generate(rows, params, batch_size=5)
    in_pairs = Engine(weights).generate(list(reversed(rows)), params, batch_size=2)
    alone = [Engine(weights).generate([row], params)[0] for row in rows]
    assert [r.new_ids for r in together] == [r.new_ids for r in alone]
    assert [r.new_ids for r in reversed(in_pairs)] == [r.new_ids for r in alone]
    assert len({r.new_ids for r in together}) > 1


def flat_logits(rows: int, vocab: int = 128_000, device: str = "cpu") -> torch.Tensor:
    """Logits spread like the flat test model's (about 0.25): thousands of near ties."""
    generator = torch.Generator().manual_seed(11)
    return (torch.randn(rows, vocab, generator=generator) * 0.25).to(device)


def test_running_sums_are_the_same_in_any_order_of_addition():
    """The sums the nucleus and the draw use are exact: adding the vocabulary in blocks (as a
    parallel scan does) gives the same bits as adding it in one pass, which float sums do not."""
    probs = torch.softmax(flat_logits(4).double(), dim=-1)
    blocks = probs.reshape(4, 250, 512)
    in_one_pass = fixed_cumsum(probs)
    within = fixed_cumsum(blocks)  # each block on its own, then the blocks' totals carried in
    carried = torch.cumsum(within[..., -1], dim=-1) - within[..., -1]
    assert torch.equal((within + carried.unsqueeze(-1)).reshape(4, -1), in_one_pass)
    float_blocks = torch.cumsum(blocks, dim=-1)
    float_carried = torch.cumsum(float_blocks[..., -1], dim=-1) - float_blocks[..., -1]
    by_blocks = (float_blocks + float_carried.unsqueeze(-1)).reshape(4, -1)
    assert not torch.equal(by_blocks, torch.cumsum(probs, dim=-1))  # the hazard, in float64
    assert abs(int(in_one_pass[0, -1]) - FIXED_ONE) <= probs.shape[-1]


def test_a_draw_never_lands_past_the_end_or_on_a_blocked_token():
    """Uniforms at the very top of [0, 1) pick the last token that has a probability."""
    logits = torch.tensor([[3.0, 2.0, 1.0, float("-inf"), float("-inf")]])
    params = SamplingParams(top_p=0.0, seed=0)
    keys = [f"k{n}" for n in range(2000)]
    picks = sample_next(logits.expand(2000, -1), params, keys, [0] * 2000)
    assert set(picks.tolist()) == {0, 1, 2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_same_logits_always_draw_the_same_tokens():
    """Flat logits over the real vocabulary's size, 64 rows, nucleus 0.9: 50 draws on the GPU
    are one draw (CUDA's float cumsum gave other tokens now and then: sampling.py)."""
    logits = flat_logits(64, device="cuda")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    keys, steps = [f"row-{n}" for n in range(64)], [11] * 64
    draws = {tuple(sample_next(logits, params, keys, steps).tolist()) for _ in range(50)}
    assert len(draws) == 1


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ConfigError, match="top_k"):
        SamplingParams(top_k=-1)
    assert SamplingParams(greedy=True, temperature=0.0).greedy
