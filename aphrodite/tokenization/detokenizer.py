"""Incremental detokenization for streaming.

Decoding all output ids after every token costs O(length) per token. Instead each step decodes
a short window ``ids[prefix:]`` and emits what it adds to the already-emitted ``ids[prefix:read]``
(the prefix/read offset technique). This is exact because the tokenizers' decoders compose at
token boundaries where the text so far is complete, so emission is held back while it is not:

* the window's text ends in U+FFFD: a byte-level token stopped mid UTF-8 character;
* the newest token is a byte-fallback token (``<0xE4>``): the ByteFallback decoder turns a whole
  run of them into U+FFFDs, *including valid bytes before*, until the run is followed by an
  ordinary token, so the run must be closed before its text is final;
* the prefix window renders to nothing: a decoder that strips the first token's leading space
  (sentencepiece) would then strip it from the new text instead; the prefix is kept longer.

Skipped special tokens decode to nothing anywhere, so they are dropped from the window instead
of growing it. Up to five prompt tokens are decoded before the first output token so that the
first token's leading space or merge is rendered as it is in context.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class _TokenizerFacts:
    """Per-tokenizer id sets the detokenizer needs, computed once."""

    def __init__(self, tokenizer: Any) -> None:
        unk = getattr(tokenizer, "unk_token_id", None)
        byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
        self.byte_ids = frozenset(i for i in byte_ids if i is not None and i != unk)
        candidates = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                candidates.add(token_id)
        # Only ids that really vanish when skipped may be dropped from the window.
        self.skipped_ids = frozenset(
            i for i in candidates if tokenizer.decode([i], skip_special_tokens=True) == "")


_FACTS: weakref.WeakKeyDictionary[Any, _TokenizerFacts] = weakref.WeakKeyDictionary()


def _facts(tokenizer: Any) -> _TokenizerFacts:
    try:
        facts = _FACTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _TokenizerFacts(tokenizer)
    if facts is None:
        facts = _FACTS[tokenizer] = _TokenizerFacts(tokenizer)
    return facts


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, a step at a time.

    ``step`` returns only finalized text, never part of a character; ``flush`` returns what is
    still held back (call it when the sequence finishes). After ``flush``, ``text`` equals
    ``tokenizer.decode(output_token_ids, skip_special_tokens=...)``, with two deliberate
    exceptions: a sentencepiece decoder's stripped first space is kept when a prompt precedes
    (the text continues the prompt), and ``clean_up_tokenization_spaces`` is never applied
    (it does not compose; transformers skips it for BPE tokenizers anyway).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] | None,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        facts = _facts(tokenizer)
        self._byte_ids = facts.byte_ids
        self._dropped_ids = facts.skipped_ids if skip_special_tokens else frozenset()
        self.output_token_ids: list[int] = []
        self._chunks: list[str] = []
        self._text = ""

        prompt = prompt_token_ids if prompt_token_ids is not None else []
        context = [int(t) for t in prompt[-_CONTEXT_TOKENS:]]
        context = [t for t in context if t not in self._dropped_ids]
        context_text = self._decode(context) if context else ""
        if not context_text or context_text.endswith(_REPLACEMENT) or context[-1] in self._byte_ids:
            context, context_text = [], ""  # no clean boundary to continue from
        self._ids = context                 # window tokens: context + output, minus dropped ids
        self._prefix = 0                    # window start
        self._read = len(context)           # end of the emitted part
        self._prefix_text = context_text    # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._chunks:
            self._text += "".join(self._chunks)
            self._chunks.clear()
        return self._text

    def _emit(self, window_text: str) -> str:
        """Emit what ``window_text`` (= decode(ids[prefix:])) adds, and move the offsets."""
        delta = window_text[len(self._prefix_text):]
        new_prefix = self._read
        chunk = self._decode(self._ids[new_prefix:])
        if chunk:  # the next prefix window must render to something (see the module docstring)
            self._ids = self._ids[new_prefix:]
            self._prefix, self._prefix_text = 0, chunk
        else:
            self._prefix_text = window_text
        self._read = len(self._ids)
        self._chunks.append(delta)
        return delta

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Append ``new_token_ids``; return the text they finalize (possibly "")."""
        out = []
        for token_id in new_token_ids:
            token_id = int(token_id)
            self.output_token_ids.append(token_id)
            if token_id in self._dropped_ids:
                continue
            self._ids.append(token_id)
            if token_id in self._byte_ids:
                continue  # a byte-fallback run is final only once an ordinary token closes it
            window_text = self._decode(self._ids[self._prefix:])
            if len(window_text) > len(self._prefix_text) and not window_text.endswith(_REPLACEMENT):
                out.append(self._emit(window_text))
        return "".join(out)

    def flush(self) -> str:
        """Everything still held back (a trailing partial character comes out as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        window_text = self._decode(self._ids[self._prefix:])
        if len(window_text) <= len(self._prefix_text):
            return ""
        return self._emit(window_text)
