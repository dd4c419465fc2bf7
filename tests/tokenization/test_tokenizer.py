"""Tokenizer loading (GGUF, with its conversion cache; HF directories) and chat templates."""
from __future__ import annotations

import http.server
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from aphrodite.modeling.loader.gguf_loader import read_gguf_metadata
from aphrodite.tokenization import tokenizer as tokenizer_module
from aphrodite.tokenization.chat_template import apply_chat_template, load_chat_template
from aphrodite.tokenization.tokenizer import get_tokenizer

SAMPLES = [
    "Hello, world!",
    "  leading spaces, trailing spaces  ",
    "Numbers 2024 and 3.14159 and 1,000,000.",
    "Tabs\tand\nnew\n\nlines\r\n",
    "Unicode: 你好，世界 — café, naïve, Ä Ö Ü ß, Ελληνικά, русский, العربية",
    "Emoji 🤗🎉👨‍👩‍👧 and flags 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # code",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke. 😀"}],
]


def _random_text(rng: random.Random) -> str:
    alphabet = "abcXYZ 0123456789 .,!?\n\t你好世界éü🤗<|>"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


# --- GGUF tokenizer -------------------------------------------------------------------------------

def test_gguf_tokenizer_matches_transformers(gguf_tokenizer: Any, reference_tokenizer: Any) -> None:
    rng = random.Random(0)
    texts = SAMPLES + [_random_text(rng) for _ in range(200)]
    for text in texts:
        ids = gguf_tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text), text
        assert gguf_tokenizer.decode(ids) == reference_tokenizer.decode(ids) == text
    ids = [rng.randrange(len(reference_tokenizer)) for _ in range(500)]
    for skip in (True, False):
        assert gguf_tokenizer.decode(ids, skip_special_tokens=skip) == reference_tokenizer.decode(
            ids, skip_special_tokens=skip)
    assert len(gguf_tokenizer) == len(reference_tokenizer) == 49152
    assert gguf_tokenizer.is_fast


def test_gguf_tokenizer_special_tokens_and_template(gguf_tokenizer: Any, reference_tokenizer: Any,
                                                    default_gguf_path: str) -> None:
    meta = read_gguf_metadata(default_gguf_path, {"tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                                                  "tokenizer.ggml.eos_token_id"})
    assert gguf_tokenizer.chat_template == meta["tokenizer.chat_template"] == reference_tokenizer.chat_template
    assert gguf_tokenizer.eos_token_id == meta["tokenizer.ggml.eos_token_id"] == 2
    assert gguf_tokenizer.eos_token == "<|im_end|>"
    assert gguf_tokenizer.bos_token_id == meta["tokenizer.ggml.bos_token_id"] == 1
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "all_special_ids"):
        assert getattr(gguf_tokenizer, attr) == getattr(reference_tokenizer, attr), attr
    # No BOS is added: the chat template writes the control tokens itself.
    ids = gguf_tokenizer("Hi").input_ids
    assert ids == reference_tokenizer("Hi").input_ids and len(ids) == 1 and ids[0] != 1
    assert gguf_tokenizer.name_or_path == default_gguf_path


def test_gguf_tokenizer_cache_is_used(gguf_tokenizer: Any, default_gguf_path: str, tokenizer_cache: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(list((tokenizer_cache / "tokenizers").iterdir())) == 1

    def no_conversion(path: str) -> Any:
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tokenizer_cache))
    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", no_conversion)
    warm = get_tokenizer(os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path))
    assert warm.chat_template == gguf_tokenizer.chat_template
    assert warm.encode(SAMPLES[4]) == gguf_tokenizer.encode(SAMPLES[4])
    # Same form the engine uses: the file path plus its base name.
    warm = get_tokenizer(default_gguf_path, gguf_file=os.path.basename(default_gguf_path))
    assert warm.eos_token_id == 2


def test_damaged_cache_entry_is_rebuilt(default_gguf_path: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, gguf_tokenizer: Any) -> None:
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path))
    entry = tokenizer_module.tokenizer_cache_dir() / tokenizer_module._cache_key(default_gguf_path)
    entry.mkdir(parents=True)
    (entry / "tokenizer.json").write_text("{broken")
    (entry / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", lambda path: gguf_tokenizer)
    tok = get_tokenizer(default_gguf_path)
    assert tok.encode("Hello") == gguf_tokenizer.encode("Hello")
    assert (entry / "chat_template.jinja").is_file()


def test_hf_directory_tokenizer(gguf_tokenizer: Any, tmp_path: Path) -> None:
    gguf_tokenizer.save_pretrained(tmp_path)
    tok = get_tokenizer(str(tmp_path))
    assert tok.encode(SAMPLES[4]) == gguf_tokenizer.encode(SAMPLES[4])
    assert tok.chat_template == gguf_tokenizer.chat_template


def test_tokenizer_errors(tmp_path: Path, default_gguf_path: str) -> None:
    with pytest.raises(ValueError, match="not found"):
        get_tokenizer(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(ValueError):
        get_tokenizer(str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError, match="names another"):
        get_tokenizer(default_gguf_path, gguf_file="other.gguf")


# --- chat templates -----------------------------------------------------------------------------

@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_apply_chat_template_matches_transformers(gguf_tokenizer: Any, conversation: list[dict[str, str]],
                                                  add_generation_prompt: bool) -> None:
    ours = apply_chat_template(gguf_tokenizer, conversation, add_generation_prompt=add_generation_prompt)
    theirs = gguf_tokenizer.apply_chat_template(conversation, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_apply_chat_template_default_model_prompt(gguf_tokenizer: Any) -> None:
    text = apply_chat_template(gguf_tokenizer, CONVERSATIONS[0])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_apply_chat_template_content_parts(gguf_tokenizer: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}]
    assert apply_chat_template(gguf_tokenizer, parts) == apply_chat_template(gguf_tokenizer, plain)
    with pytest.raises(ValueError, match="image_url"):
        apply_chat_template(gguf_tokenizer, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_apply_chat_template_continue_final_message(gguf_tokenizer: Any) -> None:
    conversation = [{"role": "user", "content": "Count to three."},
                    {"role": "assistant", "content": "One, two,"}]
    text = apply_chat_template(gguf_tokenizer, conversation, add_generation_prompt=False,
                               continue_final_message=True)
    assert text == gguf_tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    assert text.endswith("One, two,")
    with pytest.raises(ValueError, match="cannot both"):
        apply_chat_template(gguf_tokenizer, conversation, add_generation_prompt=True, continue_final_message=True)


def test_apply_chat_template_override_and_kwargs(gguf_tokenizer: Any) -> None:
    template = ("{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}"
                "{% if add_generation_prompt %}<{{ greeting }}>{% endif %}{{ tools | length if tools else 0 }}")
    messages = [{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"},
                {"role": "tool", "content": "42"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = apply_chat_template(gguf_tokenizer, messages, chat_template=template,
                               chat_template_kwargs={"greeting": "go"}, tools=tools)
    assert text == "[developer|rules][user|hi][tool|42]<go>1"


def test_apply_chat_template_errors(gguf_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="at least one"):
        apply_chat_template(gguf_tokenizer, [])
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        apply_chat_template(gguf_tokenizer, [{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(_NoTemplate(gguf_tokenizer), CONVERSATIONS[0])
    with pytest.raises(ValueError, match="tokenize"):
        apply_chat_template(gguf_tokenizer, CONVERSATIONS[0], chat_template_kwargs={"tokenize": True})
    with pytest.raises(ValueError, match="roles must alternate"):
        apply_chat_template(gguf_tokenizer, CONVERSATIONS[0],
                            chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="content"):
        apply_chat_template(gguf_tokenizer, [{"role": "user", "content": 3}])


class _NoTemplate:
    """A tokenizer stand-in without a chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.chat_template = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def test_load_chat_template(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert load_chat_template(None) is None
    assert load_chat_template(str(path)) == template
    assert load_chat_template(template) == template
    with pytest.raises(ValueError, match="neither"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_load_chat_template_from_url(tmp_path: Path) -> None:
    template = "{{ messages[0].content }}"
    (tmp_path / "t.jinja").write_text(template)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert load_chat_template(f"{base}/t.jinja") == template
        with pytest.raises(ValueError, match="download"):
            load_chat_template(f"{base}/missing.jinja")
    finally:
        server.shutdown()
        server.server_close()


def test_time_budget_renders_the_same_and_stops_runaway_templates(gguf_tokenizer: Any) -> None:
    """A template from a request renders as without a budget (transformers is the reference) until
    its budget runs out; then a ValueError, promptly, and the thread's tracing is as before."""
    import sys
    import time
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    template = "{% for m in messages %}{% for c in m['content'] %}{{ c }}{% endfor %}|{% endfor %}"
    before = sys.gettrace()
    assert apply_chat_template(gguf_tokenizer, conversation, chat_template=template, time_budget_s=2.0) == \
        gguf_tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
    runaway = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(ValueError, match="budget of 0.3 s"):
        apply_chat_template(gguf_tokenizer, conversation, chat_template=runaway, time_budget_s=0.3)
    assert time.monotonic() - start < 2.0
    assert sys.gettrace() is before
