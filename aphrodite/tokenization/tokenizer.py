"""Load the tokenizer of a model: a Hugging Face directory, a hub id, or a GGUF file.

A GGUF file carries its tokenizer (vocabulary, merges, special ids, chat template) in its
metadata. Transformers can turn that into a fast tokenizer, but through ``AutoTokenizer``
it takes seconds (it parses the whole file to build a model config first), so the converted
tokenizer is saved once under a user cache directory, keyed by the file's path, size and
mtime and the library versions, and later loads read those small JSON files instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aphrodite.utils import cache_dir

logger = logging.getLogger(__name__)

__all__ = ["get_tokenizer", "tokenizer_cache_dir"]

# Bump when what is written to the cache changes meaning.
_CACHE_FORMAT = 1


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers live (see ``aphrodite.utils.cache_dir``)."""
    return cache_dir("tokenizers")


def _resolve_gguf(name_or_path: str, gguf_file: str | None) -> str | None:
    """The full path of the GGUF to read the tokenizer from, or None for a non-GGUF tokenizer."""
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        if not path.endswith(".gguf") and gguf_file is None:
            raise ValueError(f"Tokenizer path {name_or_path} is a file but not a .gguf file; pass the "
                             "model directory instead.")
        if gguf_file is not None and os.path.basename(path) != os.path.basename(gguf_file):
            raise ValueError(f"Tokenizer path {name_or_path} is a file, and gguf_file={gguf_file!r} names "
                             "another one.")
        return os.path.abspath(path)
    if gguf_file is None:
        return None
    candidate = gguf_file if os.path.isabs(gguf_file) else os.path.join(path, gguf_file)
    if not os.path.isfile(candidate):
        raise ValueError(f"GGUF file {gguf_file!r} not found in {name_or_path}")
    return os.path.abspath(candidate)


def _cache_key(gguf_path: str) -> str:
    import tokenizers
    import transformers
    st = os.stat(gguf_path)
    ident = (f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|transformers={transformers.__version__}|"
             f"tokenizers={tokenizers.__version__}|format={_CACHE_FORMAT}")
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _check_gguf_metadata(tokenizer: Any, gguf_path: str) -> None:
    """Make the converted tokenizer agree with the GGUF's chat template and special ids."""
    from aphrodite.modeling.loader.gguf_loader import read_gguf_metadata

    meta = read_gguf_metadata(gguf_path, {"tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                                          "tokenizer.ggml.eos_token_id"})
    template = meta.get("tokenizer.chat_template")
    if template and tokenizer.chat_template != template:
        logger.warning("Setting the chat template of %s from its GGUF metadata.", gguf_path)
        tokenizer.chat_template = template
    for attr, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        token_id = meta.get(key)
        if token_id is not None and token_id < len(tokenizer) and getattr(tokenizer, f"{attr}_id") != token_id:
            token = tokenizer.convert_ids_to_tokens(token_id)
            logger.warning("Setting %s of %s to %r (id %d) from its GGUF metadata.", attr, gguf_path, token,
                           token_id)
            setattr(tokenizer, attr, token)


def _convert_gguf_tokenizer(gguf_path: str) -> Any:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    _check_gguf_metadata(tokenizer, gguf_path)
    return tokenizer


def _save_to_cache(tokenizer: Any, target: Path) -> None:
    """Write atomically: save into a temporary sibling, then rename; a concurrent writer may win."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as e:
        logger.warning("Cannot cache the converted tokenizer in %s: %s", target.parent, e)
        return
    try:
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError as e:
        if not target.is_dir():
            logger.warning("Cannot cache the converted tokenizer in %s: %s", target, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf_tokenizer(gguf_path: str) -> Any:
    from transformers import AutoTokenizer
    target = tokenizer_cache_dir() / _cache_key(gguf_path)
    if target.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(target)
            tokenizer.name_or_path = gguf_path
            return tokenizer
        except Exception as e:  # a damaged cache entry: rebuild it
            logger.warning("Ignoring the cached tokenizer in %s (%s: %s)", target, type(e).__name__, e)
            shutil.rmtree(target, ignore_errors=True)
    tokenizer = _convert_gguf_tokenizer(gguf_path)
    _save_to_cache(tokenizer, target)
    tokenizer.name_or_path = gguf_path
    return tokenizer


def get_tokenizer(name_or_path: str, *, gguf_file: str | None = None, revision: str | None = None,
                  trust_remote_code: bool = False) -> Any:
    """A transformers fast tokenizer for a HF directory, a hub id, or a GGUF file.

    For GGUF, ``name_or_path`` is the .gguf file itself, or its directory with ``gguf_file``
    naming it. Raises ``ValueError`` when the tokenizer cannot be found or built.
    """
    gguf_path = _resolve_gguf(name_or_path, gguf_file)
    if gguf_path is not None:
        try:
            return _load_gguf_tokenizer(gguf_path)
        except Exception as e:  # transformers raises many kinds for vocabularies it cannot convert
            raise ValueError(f"Could not build a tokenizer from GGUF file {gguf_path} "
                             f"({type(e).__name__}: {e})") from e
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a tokenizer from {name_or_path!r}: {e}") from e
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("The tokenizer of %s is not a fast (Rust) tokenizer; decoding will be slower.",
                       name_or_path)
    return tokenizer
