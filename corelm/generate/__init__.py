"""Token-id generation: KV-cache prefill/decode, sampling, batching, streaming, beam search."""

from corelm.generate.engine import SamplingParams, beam_search, generate, generate_stream, stream

__all__ = ["SamplingParams", "beam_search", "generate", "generate_stream", "stream"]
