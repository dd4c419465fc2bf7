"""The sampler layer; the samplers themselves live in ``samplers/`` (one module per family)."""
from aphrodite.modeling.layers.samplers import (
                                                Sampler,
                                                SamplerOutput,
                                                SamplingMetadata,
                                                gather_logprobs,
                                                run_chain,
                                                sample_from_logits,
                                                uniform_from_seed,
)

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "gather_logprobs", "run_chain", "sample_from_logits",
           "uniform_from_seed"]
