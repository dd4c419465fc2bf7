"""Incremental detokenization must end where a full decode ends, without ever streaming a
partial character, at a bounded cost per token."""
from __future__ import annotations

import random
from typing import Any

import pytest

from aphrodite.tokenization.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 世界! 🤗🎉 emoji, ÄÖÜ, 日本語のテキスト. Family: 👨‍👩‍👧 flag: 🇯🇵",
    "  two leading spaces, a tab\tand\nnewlines\n\n  indented",
    "中文字符和标点符号：“引号”、（括号）。😀😃😄",
]


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None) -> list[str]:
    """Feed ``ids`` in chunks of 1-3 tokens (1 when no rng) and return every step's output."""
    pieces, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3) if rng else 1
        pieces.append(detok.step(ids[i:i + k]))
        i += k
    return pieces


def _check(tok: Any, ids: list[int], prompt: list[int], skip: bool, rng: random.Random | None,
           expected: str | None = None, held_runs: bool = False) -> list[str]:
    """Stream ``ids``; the result must equal the full decode. ``held_runs``: the tokenizer has
    byte-fallback tokens, whose trailing run is held until flush even when it is valid text."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = _stream(detok, ids, rng)
    streamed = "".join(pieces)
    assert detok.text == streamed
    tail = detok.flush()
    full = tok.decode(ids, skip_special_tokens=skip) if expected is None else expected
    assert streamed + tail == full == detok.text, (ids, prompt)
    assert detok.output_token_ids == ids
    if "\ufffd" not in full:
        assert "\ufffd" not in streamed
        assert tail == "" or held_runs
    return pieces


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences(gguf_tokenizer: Any, skip: bool) -> None:
    rng = random.Random(1234)
    vocab = len(gguf_tokenizer)
    saw_replacement = 0
    for _ in range(400):
        # Half the ids from the first 300 (special, single-byte and short tokens), where bytes that
        # split characters live, half from the whole vocabulary.
        ids = [rng.randrange(300) if rng.random() < 0.5 else rng.randrange(vocab)
               for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        _check(gguf_tokenizer, ids, prompt, skip, rng)
        saw_replacement += "\ufffd" in gguf_tokenizer.decode(ids)
    assert saw_replacement > 50  # the sample did exercise text with U+FFFD mid-way


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_never_streams_partial_characters(gguf_tokenizer: Any, text: str) -> None:
    ids = gguf_tokenizer.encode(text)
    prompt = gguf_tokenizer.encode("<|im_start|>assistant\n")
    pieces = _check(gguf_tokenizer, ids, prompt, True, None)
    assert "".join(pieces) == text
    if not text.isascii():  # such characters span several byte-level tokens: some steps waited
        assert any(p == "" for p in pieces)
    assert all("\ufffd" not in p for p in pieces)


def test_leading_space_tokens(gguf_tokenizer: Any) -> None:
    ids = gguf_tokenizer.encode(" Paris is  the capital")
    detok = IncrementalDetokenizer(gguf_tokenizer, gguf_tokenizer.encode("The capital of France is"))
    assert "".join(_stream(detok, ids)) == " Paris is  the capital"
    detok = IncrementalDetokenizer(gguf_tokenizer, [])
    assert detok.step(ids[:1]) == " Paris"


def test_special_tokens(gguf_tokenizer: Any) -> None:
    ids = gguf_tokenizer.encode("Hi<|im_end|><|im_end|> there<|im_start|>")
    assert _check(gguf_tokenizer, ids, [], True, None, "Hi there")
    assert _check(gguf_tokenizer, ids, [], False, None, "Hi<|im_end|><|im_end|> there<|im_start|>")


def test_unfinished_character_comes_out_on_flush(gguf_tokenizer: Any) -> None:
    ids = gguf_tokenizer.encode("ok 🤗")
    detok = IncrementalDetokenizer(gguf_tokenizer, [])
    streamed = "".join(_stream(detok, ids[:-1]))
    assert streamed == "ok" or streamed == "ok "
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == gguf_tokenizer.decode(ids[:-1])
    assert detok.flush() == ""


def test_cost_per_token_is_bounded(gguf_tokenizer: Any) -> None:
    """The decoded window stays short however long the output grows."""
    windows: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(gguf_tokenizer, name)

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            windows.append(len(ids))
            return gguf_tokenizer.decode(ids, **kwargs)

    ids = gguf_tokenizer.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(Counting(), [])
    windows.clear()
    _stream(detok, ids)
    assert len(ids) > 1000
    assert max(windows) <= 8
    assert len(windows) <= 2 * len(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_sentencepiece_byte_fallback(sentencepiece_tokenizer: Any, skip: bool) -> None:
    """Byte-fallback tokens (<0xE4>) and a decoder that strips the first space, Llama-2 style."""
    tok = sentencepiece_tokenizer
    rng = random.Random(7)
    for _ in range(1000):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        _check(tok, ids, [], skip, rng, held_runs=True)
    ids = tok.encode("hello world 中文 é 🤗", add_special_tokens=False)
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)
    pieces = _check(tok, ids, [], True, None, held_runs=True)
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_prompt_context_keeps_leading_space(sentencepiece_tokenizer: Any) -> None:
    """After a prompt, the first output token's space is kept (the decoder strips it only at the
    very start of a text), so prompt + output reads right."""
    tok = sentencepiece_tokenizer
    world = tok.convert_tokens_to_ids(["▁world"])
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    assert detok.step(world) == " world"
    fresh = IncrementalDetokenizer(tok, [])
    assert fresh.step(world) == "world" == tok.decode(world)
