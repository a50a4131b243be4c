"""Generation: sampling, the continuous-batching engine over the latent cache, MTP speculative decoding."""

from .engine import Completion, Engine, RequestHandle, RequestOutput, StreamEvent
from .sampling import SampleResult, SamplingParams, derive_seed, make_generator, process_logits, sample, token_logprobs
from .speculative import SpeculativeOutput, speculative_generate

__all__ = ["Completion", "Engine", "RequestHandle", "RequestOutput", "SampleResult", "SamplingParams",
           "SpeculativeOutput", "StreamEvent", "derive_seed", "make_generator", "process_logits", "sample",
           "speculative_generate", "token_logprobs"]
