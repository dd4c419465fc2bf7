"""Token embedding and LM head, split by vocabulary range across tensor-parallel ranks.

Rank r holds rows ``[r*n, (r+1)*n)`` of the (padded) vocabulary. A lookup zeroes the ids
another rank owns and all-reduces; logits are all-gathered and cut back to the true vocab.
With one rank there is no padding and both are a plain ``F.embedding`` / ``F.linear``.
A quantization config may hand the table an embedding method (GGUF keeps its blocks: rows are
dequantized on lookup and the LM head multiplies the blocks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.distributed.communication import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from aphrodite.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from aphrodite.modeling.layers.linear import copy_into, dense, new_parameter
from aphrodite.modeling.layers.quantization import QuantizationConfig


class VocabParallelEmbedding(nn.Module):
    """Embedding table ``[vocab_per_rank, embedding_dim]``; vocab padded to a multiple of tp_size."""

    packed_weight: torch.Tensor | None = None   # the LM head's CPU GEMM copy, see ``pack_cpu_weight``

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        method = quant_config.get_embedding_method(self, prefix) if quant_config is not None else None
        self.quant_method = method
        if method is None:
            self.weight = new_parameter((self.rows_per_rank, embedding_dim), self.weight_loader)
        else:
            method.create_embedding_weights(self, self.rows_per_rank, embedding_dim, torch.get_default_dtype(),
                                            self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(f"vocab size mismatch: model {self.num_embeddings}, checkpoint "
                             f"{loaded_weight.shape[0]}")
        n = self.vocab_end - self.vocab_start
        copy_into(param.data[:n], loaded_weight[self.vocab_start:self.vocab_end])
        if n < param.shape[0]:
            param.data[n:].zero_()

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.embedding(self, ids)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill_(outside, 0)
        out = self._lookup(local).masked_fill_(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; shares the embedding's sharding so tied weights line up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, quant_config, prefix)
        if bias:
            self.bias = new_parameter((self.rows_per_rank,), self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied with compute_lm_logits(), not called.")


def compute_lm_logits(head: VocabParallelEmbedding, hidden: torch.Tensor,
                      soft_cap: float | None = None) -> torch.Tensor:
    """float32 logits ``[N, vocab]`` of ``hidden [N, d]`` against ``head``'s (possibly tied) weight; with
    ``soft_cap`` (Gemma 2), ``soft_cap * tanh(logits / soft_cap)``, fused into the cast to float32."""
    bias = getattr(head, "bias", None)
    if head.quant_method is not None:
        logits = head.quant_method.apply(head, hidden, bias)
    else:
        logits = dense(hidden, head.weight, bias, head.packed_weight)
    if head.tp_size > 1:
        logits = tensor_model_parallel_all_gather(logits, dim=-1)[..., :head.num_embeddings]
    if soft_cap:
        from aphrodite.kernels.activation import soft_cap as cap_logits
        return cap_logits(logits, soft_cap)
    return logits.float()
