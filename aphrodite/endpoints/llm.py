"""``LLM``: offline batched inference, with vLLM's class interface."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aphrodite.engine.engine import LLMEngine, PromptType
from aphrodite.engine_args import EngineArgs
from aphrodite.lora.request import LoRARequest
from aphrodite.outputs import RequestOutput
from aphrodite.sampling_params import SamplingParams
from aphrodite.utils import configure_default_logging

Messages = list[dict[str, Any]]


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    ``LLM()`` loads the default model; any engine argument (``dtype``, ``max_model_len``,
    ``tensor_parallel_size``, ...) may be passed as a keyword.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        configure_default_logging()
        self.engine_args = EngineArgs.from_dict({"model": model, **kwargs})
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = 0

    def start_profile(self) -> None:
        """Start torch.profiler on every rank (vLLM's method); see ``aphrodite.worker.profiler``."""
        self.llm_engine.executor.collective_rpc("start_profile")

    def stop_profile(self) -> list[Any]:
        """Stop it; every rank's ``ProfileSummary`` (wall, kernel time, launches, top kernels)."""
        return self.llm_engine.executor.collective_rpc("stop_profile")

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call ``Worker.method(*args)`` on every rank, between steps (vLLM's method)."""
        return self.llm_engine.executor.collective_rpc(method, *args)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, *,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        ``lora_request``: one adapter for every prompt, or a list with one (or None) per prompt."""
        if prompt_token_ids is not None:
            prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        items = _as_prompt_list(prompts)
        params = _broadcast_params(sampling_params, len(items))
        loras = _broadcast_loras(lora_request, len(items))
        # Validate everything first so a bad prompt (or adapter) fails before any work starts.
        engine = self.llm_engine
        tokenized = [engine.tokenize_prompt(p) for p in items]
        for (_, ids), sp in zip(tokenized, params):
            engine.validate(ids, sp)
        for lora in dict.fromkeys(x for x in loras if x is not None):
            engine.add_lora(lora)
        engine.compile_structured_outputs(params)   # a bad schema or grammar: ValueError before any work
        ids = []
        for (text, toks), sp, lora in zip(tokenized, params, loras):
            rid = str(self._counter)
            self._counter += 1
            engine.add_request(rid, {"prompt": text, "prompt_token_ids": toks}, sp, lora_request=lora)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Apply the chat template to each conversation, then generate. ``tools`` (OpenAI function tools, as
        vLLM's ``LLM.chat`` takes them) reach the template, which decides how the model sees them."""
        from aphrodite.tokenization.chat_template import apply_chat_template
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat() needs a tokenizer (skip_tokenizer_init=True was given).")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = apply_chat_template(tok, conv, chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message,
                                       chat_template_kwargs=chat_template_kwargs, tools=tools)
            # The template already holds the BOS token where the model wants one.
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step(finished_only=True):
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request(list(engine.parents))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if prompts is None:
        raise ValueError("generate() needs prompts.")
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]          # one prompt given as token ids
    return prompts


def _broadcast_loras(lora: Any, n: int) -> list[LoRARequest | None]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * n
    loras = list(lora)
    if len(loras) != n:
        raise ValueError(f"Got {len(loras)} LoRA requests for {n} prompts; pass one or one per prompt.")
    for x in loras:
        if x is not None and not isinstance(x, LoRARequest):
            raise ValueError(f"lora_request entries must be LoRARequest or None, got {type(x).__name__}.")
    return loras


def _broadcast_params(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"Got {len(params)} sampling params for {n} prompts; pass one or one per prompt.")
    return params
