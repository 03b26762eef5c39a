"""Weight-only quantization: int8 per channel, int4 group-wise, and GGUF's Q4_0/Q4_1/Q8_0 blocks.

One module per job, imported by their own names (this package re-exports nothing):

- :mod:`corelm.quant.layers`: the quantized layers, one memory layout per class (``Int8Linear``,
  ``Int8Embedding``, ``Int4Linear`` on corelm's C++ kernels, ``Int4PackedLinear`` on PyTorch's
  int4pack kernels, ``Q8Linear``), the kernel operators and which kernels a new layer uses.
- :mod:`corelm.quant.gguf_blocks`: GGUF blocks mapped onto those layouts without dequantizing.
- :mod:`corelm.quant.gguf_quantize`: float matrices to GGUF blocks (Q4_0 ... Q8_0, Q4_K/Q5_K/Q6_K), and
  which type each tensor of a llama.cpp mix (``Q4_K_M``, ...) gets.
- :mod:`corelm.quant.experts`: a MoE's routed experts as one quantized SwiGLU per expert (int4/int8, or a
  GGUF file's expert stacks split by expert in their stored types).
- :mod:`corelm.quant.transform`: ``quantize_model`` (swap a model's ``nn.Linear`` children for
  quantized layers, tie the embedding to a quantized head) and ``quantized_structure``.
- :mod:`corelm.quant.io`: quantized state dicts and ``corelm quantize`` checkpoint directories.
"""
