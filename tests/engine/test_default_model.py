"""The default model (SmolLM2-135M-Instruct GGUF) against transformers loading the same file."""
import os

import pytest
import torch

from aphrodite import LLM, SamplingParams

PROMPTS = ["Once upon a time", "A robot may hurt a human if", "To get started with HF transformers,",
           "The capital of France is"]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024, device="cpu")


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_greedy_equals_hf_on_prompts_and_chat(llm, default_gguf_hf_model, default_gguf_path):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(default_gguf_hf_model, out.prompt_token_ids, 24)
        assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids, skip_special_tokens=True)
    from transformers import AutoTokenizer
    ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(default_gguf_path),
                                            gguf_file=os.path.basename(default_gguf_path))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    ref_text = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ref_ids = ref_tok.encode(ref_text, add_special_tokens=False)
    assert chat.prompt_token_ids == ref_ids
    ref = default_gguf_hf_model.generate(torch.tensor([ref_ids]), max_new_tokens=32, do_sample=False)
    ref_out = ref[0, len(ref_ids):].tolist()
    got = chat.outputs[0].token_ids
    assert got == ref_out[:len(got)]
    assert chat.outputs[0].finish_reason == "stop" and "Paris" in chat.outputs[0].text


def test_prompt_logprobs_agree_with_hf(llm, default_gguf_hf_model):
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=1, prompt_logprobs=1, logprobs=3),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids
    ref = torch.log_softmax(default_gguf_hf_model(torch.tensor([ids])).logits[0].double(), -1)
    for pos in range(1, len(ids)):
        assert abs(out.prompt_logprobs[pos][ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-3
    sample_lp = out.outputs[0].logprobs[0]
    assert len(sample_lp) >= 3
    top = ref[-1].topk(3)
    for tid, val in zip(top.indices.tolist(), top.values.tolist()):
        assert abs(sample_lp[tid].logprob - val) < 1e-3


def test_stop_strings_and_include(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    words = base.split()
    stop = words[3][1:3] if len(words[3]) > 2 else words[3]   # a piece of a later word, maybe across tokens
    cut = base.index(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == base[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                                  include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == base[:cut + len(stop)]


def test_skip_special_tokens(llm):
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    sp = dict(temperature=0, max_tokens=40, ignore_eos=True)
    shown = llm.generate(prompt, SamplingParams(skip_special_tokens=False, **sp), use_tqdm=False)[0].outputs[0]
    hidden = llm.generate(prompt, SamplingParams(**sp), use_tqdm=False)[0].outputs[0]
    assert shown.token_ids == hidden.token_ids
    assert "<|im_end|>" in shown.text and "<|im_end|>" not in hidden.text


def test_generate_input_forms(llm):
    sp = SamplingParams(temperature=0, max_tokens=5)
    by_text = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
    ids = [o.prompt_token_ids for o in by_text]
    assert [o.prompt for o in by_text] == PROMPTS[:2]
    by_ids = llm.generate([{"prompt_token_ids": i} for i in ids], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]
    single = llm.generate(ids[0], sp, use_tqdm=False)
    assert single[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    per_prompt = llm.generate(PROMPTS[:2], [sp, SamplingParams(temperature=0, max_tokens=2)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in per_prompt] == [5, 2]


def test_chat_with_tools_renders_as_transformers_does(llm):
    """``LLM.chat(tools=...)`` as in vLLM: the tools and an assistant's call (its JSON-text arguments given to the
    template as an object) render as transformers renders the same conversation."""
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}: "
                "{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}{% endif %}|"
                "{% endfor %}assistant:")
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    out = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=template, tools=tools)[0]
    as_object = {**call, "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    reference = llm.get_tokenizer().apply_chat_template(
        [messages[0], {**messages[1], "content": "", "tool_calls": [as_object]}, messages[2]], tools=tools,
        chat_template=template, tokenize=False)
    assert reference == '[get_time]user: Time?|assistant: {"name": "get_time", "arguments": {"zone": "UTC"}}|' \
                        "tool: 12:00|assistant:"
    assert out.prompt_token_ids == llm.get_tokenizer().encode(reference, add_special_tokens=False)
