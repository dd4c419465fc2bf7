"""Every supported family's tiny random model on the GPU through ``LLM`` (fp32: Triton kernels with IEEE
dots, CUDA graphs, async scheduling, chunked prefill, prefix caching) against Hugging Face on the same GPU:
each generated token must be HF's argmax after the tokens before it. Uses the families and tiny configs of
``tests/modeling/test_families.py`` (``aphrodite.benchmarks.tiny_families``). About a minute.

    python3 benchmarks/gpu/check_families_gpu.py [family ...]
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.tiny_families import FAMILIES, make_hf_model
    rows = []
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (5, 29, 17, 60)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    names = sys.argv[1:] or list(FAMILIES)   # optional: only the families named on the command line
    for name in names:
        hf = make_hf_model(name)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            llm = LLM(tmp, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
                      block_size=16, max_num_batched_tokens=32, enable_prefix_caching=True,
                      gpu_memory_utilization=0.2, num_gpu_blocks_override=256)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            again = llm.generate({"prompt_token_ids": prompts[1][:24] + [7, 8, 9]}, params, use_tqdm=False)
            del llm
        gc.collect()
        torch.cuda.empty_cache()
        hf = hf.cuda()
        bad = []
        for p, out in zip(prompts + [prompts[1][:24] + [7, 8, 9]], outs + again, strict=True):
            got = list(out.outputs[0].token_ids)
            with torch.inference_mode():
                logits = hf(torch.tensor([p + got[:-1]], device="cuda")).logits[0, len(p) - 1:]
            want = logits.argmax(-1).tolist()
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
                top2 = logits[first].topk(2).values.tolist()
                bad.append(f"prompt of {len(p)}: token {first} (HF top-2 logits {top2[0]:.4f} / {top2[1]:.4f})")
        del hf
        torch.cuda.empty_cache()
        rows.append(f"FAMILY {name}: " + ("ok" if not bad else "MISMATCH " + "; ".join(bad)))
        print(rows[-1], flush=True)
    print("== table ==")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
