"""The Ray executor on a two-node local cluster: one actor per rank, placed on different nodes,
same generations as one in-process rank."""
from __future__ import annotations

import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.executor.base import ExecutorDeadError

ray = pytest.importorskip("ray")

ENGINE = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=16)


def test_tp2_on_two_ray_nodes_matches_one_rank(tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.cluster_utils import Cluster
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    prompts = [{"prompt_token_ids": list(range(3 + i, 12 + 5 * i))} for i in range(4)]
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, detokenize=False),
              SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=8, ignore_eos=True, detokenize=False)] * 2
    want = LLM(tiny_llama_dir, **ENGINE).generate(prompts, params, use_tqdm=False)
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)   # what `ray start` users have: the engine joins it
        llm = LLM(tiny_llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
        executor = llm.llm_engine.executor
        nodes = ray.util.placement_group_table(executor.pg)["bundles_to_node_id"]
        assert len(set(nodes.values())) == 2          # one rank on each node
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
        ray.kill(executor.actors[1])               # a rank lost: the next generate fails, it does not hang
        with pytest.raises(ExecutorDeadError, match="Ray worker failed"):
            llm.generate(prompts, params, use_tqdm=False)
        assert not executor.actors                 # the other actor was killed too
    finally:
        ray.shutdown()
        cluster.shutdown()
