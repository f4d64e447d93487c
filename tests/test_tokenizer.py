"""The tokenizer on the real YaLM vocabulary: YaLM's conventions and the suffix rule."""

import pytest

from yalm_runner.errors import ConfigError
from yalm_runner.tokenizer import BOS_ID, EOS_ID, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(yalm_vocab):
    return Tokenizer(yalm_vocab)


def test_known_ids_match_the_reference(tokenizer):
    assert tokenizer.encode("hello world!") == [1, 49524, 2175, 127679]
    assert tokenizer.encode("Once upon a time") == [1, 12783, 4529, 265, 995]
    assert tokenizer.vocab_size == 128000


def test_empty_prompt_is_bos_alone(tokenizer):
    assert tokenizer.encode("") == [BOS_ID]
    assert tokenizer.decode([BOS_ID]) == ""


def test_newline_maps_to_nl_piece_and_back(tokenizer):
    ids = tokenizer.encode("мир!\nКак")
    assert tokenizer.newline_id == 3
    assert 3 in ids
    assert tokenizer.decode(ids) == "мир!\nКак"
    assert tokenizer.encode("\nx")[:3] == [1, tokenizer.encode(" ", add_bos=False)[0], 3]


def test_eos_and_bos_decode_to_nothing(tokenizer):
    ids = tokenizer.encode("hello world!")
    assert tokenizer.decode([*ids, EOS_ID]) == "hello world!"


def test_ellipsis_is_normalised_by_nfkc(tokenizer):
    assert tokenizer.decode(tokenizer.encode("Wait…")) == "Wait..."


def test_suffix_is_what_the_new_tokens_add_even_after_nfkc(tokenizer):
    prompt = "Wait… what"
    prompt_ids = tokenizer.encode(prompt)
    new_ids = tokenizer.encode("Wait… what happened next", add_bos=False)[len(prompt_ids) - 1 :]
    suffix = tokenizer.continuation(prompt_ids, new_ids)
    assert suffix == " happened next"
    # The original's character slice cuts in the wrong place: "…" became "...".
    full = tokenizer.decode([*prompt_ids, *new_ids])
    assert full[len(prompt) :] != suffix


def test_suffix_keeps_newlines_and_word_spaces(tokenizer):
    prompt_ids = tokenizer.encode("Акции")
    new_ids = tokenizer.encode("Акции выросли\nна 3%", add_bos=False)[len(prompt_ids) - 1 :]
    assert tokenizer.continuation(prompt_ids, new_ids) == " выросли\nна 3%"


def test_not_a_sentencepiece_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "vocab.sp"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"vocab\.sp"):
        Tokenizer(bogus)
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer(tmp_path / "missing.sp")
