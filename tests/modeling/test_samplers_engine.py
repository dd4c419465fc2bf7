"""The sampler suite inside the engine: state across steps, preemption, async scheduling, cleanup."""
from __future__ import annotations

import random

from aphrodite import LLM, SamplingParams

EVERYTHING = dict(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, top_a=0.05, tfs=0.97, eta_cutoff=1e-4,
                  epsilon_cutoff=1e-4, typical_p=0.98, smoothing_factor=0.1, xtc_probability=0.3, nsigma=3.0,
                  skew=0.2, dynatemp_min=0.7, dynatemp_max=1.1, repetition_penalty=1.1, frequency_penalty=0.1,
                  presence_penalty=0.1, dry_multiplier=0.5, no_repeat_ngram_size=3)


def engine(path, **kw):
    return LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128, block_size=16, **kw)


def test_seeded_everything_request_is_the_same_alone_mixed_preempted_and_async(tiny_llama_dir):
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 320) for _ in range(rng.randint(20, 40))]} for _ in range(6)]
    p = SamplingParams(seed=11, max_tokens=16, ignore_eos=True, **EVERYTHING)
    others = [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, dry_multiplier=0.8),
              SamplingParams(mirostat_mode=2, mirostat_tau=4.0, mirostat_eta=0.2, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature_last=True, min_p=0.1, max_tokens=16, ignore_eos=True)]
    params = [p] + [others[i % 4] for i in range(5)]
    llm = engine(tiny_llama_dir)
    alone = llm.generate(prompts[0], p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, params, use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    state = llm.llm_engine.executor.runner.sampling_state
    assert len(state) > 0
    # Finished requests reach the worker with the next step's plan; then their state is gone.
    llm.generate(prompts[0], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(state) == 0 and not state._mu
    small = engine(tiny_llama_dir, num_gpu_blocks_override=8)
    preempted = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.total_preemptions > 0
    assert [o.outputs[0].token_ids for o in preempted] == [o.outputs[0].token_ids for o in mixed]
    overlapped = engine(tiny_llama_dir, async_scheduling=True).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in mixed]
