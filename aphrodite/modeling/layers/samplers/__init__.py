"""Aphrodite's sampler suite as one vectorized chain: one module per family of samplers."""
from aphrodite.modeling.layers.samplers.chain import (
                                                      Sampler,
                                                      SamplerOutput,
                                                      gather_logprobs,
                                                      run_chain,
                                                      sample_from_logits,
)
from aphrodite.modeling.layers.samplers.metadata import SamplingMetadata, uniform_from_seed

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "gather_logprobs", "run_chain", "sample_from_logits",
           "uniform_from_seed"]
