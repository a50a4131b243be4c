"""Generation: sampling, the continuous-batching engine over the latent cache, MTP speculative decoding."""

from .engine import Completion, Engine, RequestHandle, RequestOutput, StreamEvent
from .sampling import SampleResult, SamplingParams, derive_seed, make_generator, process_logits, sample, token_logprobs
from .speculative import (DecodeProbe, SpeculativeChoice, SpeculativeOutput, choose_speculative, greedy_generate,
                          probe_decode, speculative_generate)

__all__ = ["Completion", "DecodeProbe", "Engine", "RequestHandle", "RequestOutput", "SampleResult", "SamplingParams",
           "SpeculativeChoice", "SpeculativeOutput", "StreamEvent", "choose_speculative", "derive_seed",
           "greedy_generate", "make_generator", "probe_decode", "process_logits", "sample", "speculative_generate",
           "token_logprobs"]
