"""Tokenizers for the tokenization tests, each built once per session.

``gguf_tokenizer`` goes through ``get_tokenizer`` with the conversion cache in a temporary
directory, so a session exercises the cold (convert and save) path; ``reference_tokenizer``
is what transformers builds from the same GGUF, the behaviour ours must match.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aphrodite_cache")


@pytest.fixture(scope="session")
def gguf_tokenizer(default_gguf_path: str, tokenizer_cache: Path) -> Any:
    from aphrodite.tokenization.tokenizer import get_tokenizer
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APHRODITE_CACHE_DIR", str(tokenizer_cache))
        return get_tokenizer(default_gguf_path)


@pytest.fixture(scope="session")
def reference_tokenizer(default_gguf_path: str) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(default_gguf_path),
                                         gguf_file=os.path.basename(default_gguf_path))


@pytest.fixture(scope="session")
def sentencepiece_tokenizer() -> Any:
    """A tiny Llama-2-style tokenizer: Metaspace pieces, byte fallback, first space stripped."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ["▁", "a", "b", "h", "e", "l", "o", "w", "r", "d", "▁a", "ab", "▁ab", "he", "ll", "hell",
              "hello", "▁hello", "▁w", "or", "▁wor", "▁world", "ld", "▁▁", "é", "▁é", "中", "▁中"]
    for piece in pieces:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"),
              ("▁", "hello"), ("▁", "w"), ("o", "r"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld"), ("▁", "▁"),
              ("▁", "é"), ("▁", "中")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                   fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
