"""The model math: faithful to docs/yalm.md §Architecture, and the KV cache changes nothing."""

import math

import pytest
import torch
import torch.nn.functional as F

from yalm_runner import model
from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import ConfigError, GenerationError
from yalm_runner.offload import ResidentWeights, cast_part

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def weights(tiny_store):
    return ResidentWeights(ModelStore.open(tiny_store), "cpu", torch.float32)


def sketch_logits(weights, config: ModelConfig, tokens: list[int]) -> torch.Tensor:
    """The forward pass of docs/yalm.md §Architecture, written independently of ``model``: full
    recomputation."""
    emb, head = weights.embedding(), weights.head()
    nh, d = config.num_heads, config.head_dim
    T = len(tokens)

    def ln(x, w, prefix):
        return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], 1e-5)

    def lin(x, w, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (T, NH, D)
        a, b = x[..., : d // 2], x[..., d // 2 :]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    x = ln(emb["word_embeddings.weight"][torch.tensor(tokens)], emb, "input_layernorm")
    h = x @ torch.eye(config.embedding_size, config.hidden_size)
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i, w in weights.layers():
        a = h if i == 0 else ln(h, w, "input_layernorm")
        qkv = lin(a, w, "attention.query_key_value").view(T, nh, 3, d)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = s.masked_fill(blocked, -10000.0).softmax(-1)
        h = h + lin(torch.einsum("hqk,khd->qhd", s, v).reshape(T, -1), w, "attention.dense")
        m = ln(h, w, "post_attention_layernorm")
        f = F.gelu(lin(m, w, "mlp.dense_ffn_hidden")) * lin(m, w, "mlp.dense_ffn_gate")
        h = h + lin(f, w, "mlp.dense_ffn_output")
    y = ln(h, head, "input_layer_norm")
    y = ln(F.gelu(lin(y, head, "dense")), head, "output_layer_norm")
    return y @ emb["word_embeddings.weight"].T + head["output_bias"]


def full_pass(weights, tokens: list[int]) -> torch.Tensor:
    """Every position's logits in one pass of ``model`` over a fresh cache."""
    config = weights.config
    T = len(tokens)
    rotary = model.Rotary.build(config, "cpu", torch.float32)
    positions = torch.arange(T)[None]
    mask = model.attention_mask(torch.ones(1, T, dtype=torch.bool), 0, T)
    h = model.embed(torch.tensor([tokens]), weights.embedding(), config)
    shape = (1, T, config.num_heads, config.head_dim)
    for _, w in weights.layers():
        keys, values = torch.empty(shape), torch.empty(shape)
        h = model.block(h, w, config, rotary, positions, keys, values, 0, mask)
    emb = weights.embedding()["word_embeddings.weight"]
    return model.head(h[0], weights.head(), emb, config)


def test_matches_the_spec_sketch_at_every_position(weights):
    tokens = [1, 17, 300, 42, 999, 5, 77, 123]
    ours = full_pass(weights, tokens)
    reference = sketch_logits(weights, weights.config, tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_kv_cache_decoding_equals_full_recomputation(weights):
    prompt = (1, 40, 41, 42)
    engine = Engine(weights)
    [done] = engine.generate([Request("a", prompt, 12)], GREEDY)
    sequence = list(prompt)
    for token in done.new_ids:
        logits = full_pass(weights, sequence)[-1]
        assert int(torch.argmax(logits)) == token
        sequence.append(token)
    # Logits, not only argmaxes: the cached step equals the recomputed one.
    cached = []
    engine2 = Engine(weights)
    original = model.head

    def spy(h, *args):
        logits = original(h, *args)
        cached.append(logits[0].clone())
        return logits

    model.head = spy
    try:
        engine2.generate([Request("a", prompt, 5)], GREEDY)
    finally:
        model.head = original
    for step, logits in enumerate(cached):
        recomputed = full_pass(weights, sequence[: len(prompt) + step])[-1]
        torch.testing.assert_close(logits, recomputed, rtol=1e-5, atol=2e-5)


def test_mixed_length_batch_equals_each_row_alone(weights):
    prompts = {"short": (1, 5), "mid": (1, 9, 8, 7, 6, 5), "long": tuple([1, *range(300, 320)])}
    limits = {"short": 9, "mid": 4, "long": 7}
    requests = [Request(key, prompt, limits[key]) for key, prompt in prompts.items()]
    together = Engine(weights).generate(requests, GREEDY, batch_size=8)
    for request, done in zip(requests, together, strict=True):
        [alone] = Engine(weights).generate([request], GREEDY)
        assert done.new_ids == alone.new_ids
        assert len(done.new_ids) == request.max_new_tokens or done.finish_reason == "eos"


def test_finished_rows_leave_the_batch(weights):
    requests = [Request("a", (1, 5, 6), 2), Request("b", (1, 7), 10)]
    engine = Engine(weights)
    engine.generate(requests, GREEDY)
    # One prefill + 9 single-token passes for the longest row; row a left after its 2nd token.
    assert engine.stats.forward_passes == 10
    assert engine.stats.new_tokens == 12


def test_first_layer_has_no_input_layernorm_and_the_projector_only_pads(weights):
    config = weights.config
    assert "input_layernorm.weight" not in model.expected_shapes(config, "layer_0")
    assert "input_layernorm.weight" in model.expected_shapes(config, "layer_1")
    h = model.embed(torch.tensor([[1, 2, 3]]), weights.embedding(), config)
    assert h.shape == (1, 3, config.hidden_size)
    assert torch.all(h[..., config.embedding_size :] == 0)


def test_rotary_is_identity_at_position_zero_and_relative(weights):
    config = weights.config
    rotary = model.Rotary.build(config, "cpu", torch.float32)
    q = torch.randn(1, 1, 1, config.head_dim)
    k = torch.randn(1, 1, 1, config.head_dim)
    torch.testing.assert_close(rotary.apply(q, torch.tensor([[0]])), q)

    def score(pq, pk):
        return float(
            (rotary.apply(q, torch.tensor([[pq]])) * rotary.apply(k, torch.tensor([[pk]]))).sum()
        )

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-5)


def test_bf16_runs_and_mostly_agrees_with_fp32(tiny_store):
    store = ModelStore.open(tiny_store)
    fp32 = Engine(ResidentWeights(store, "cpu", torch.float32))
    bf16 = Engine(ResidentWeights(store, "cpu", torch.bfloat16))
    request = [Request("a", (1, 11, 12, 13), 1)]
    assert fp32.generate(request, GREEDY)[0].new_ids == bf16.generate(request, GREEDY)[0].new_ids


def test_fp16_cast_refuses_values_beyond_its_range():
    tensors = {"dense.weight": torch.tensor([1.0, 7.0e4], dtype=torch.bfloat16)}
    with pytest.raises(ConfigError, match=r"dense\.weight.*fp16"):
        cast_part(tensors, torch.float16, "head", "head.safetensors")
    assert cast_part(tensors, torch.float32, "head", "x")["dense.weight"].dtype == torch.float32


def test_prompt_longer_than_positions_is_refused(weights):
    too_long = Request("big", tuple([1] * 1020), 8)
    with pytest.raises(GenerationError, match=r"big.*1024 positions"):
        Engine(weights).generate([too_long], GREEDY)
