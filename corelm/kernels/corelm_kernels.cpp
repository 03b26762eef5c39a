// corelm quantized CPU kernels: weight-only int4/int8 matmuls on the layouts corelm's quantized
// layers hold in memory, with activations quantized once per row (per block of 32 values: a scale d,
// 15-bit integers a, and d*sum(a)) and integer dot products:
//
//   y[n] = sum_b  s_w[n,b] * d_a[b] * sum_j q_w[n,b,j] * a[b,j]   (+ m_w[n,b] * d_a[b]*sum(a) for int4)
//
// This is llama.cpp's arithmetic (ggml_vec_dot_q4_1_q8_1, ggml_vec_dot_q8_0_q8_0) with wider
// activations: the weights are read once, 4.5-8.5 bits each, and multiplied without being
// dequantized to floats. Weights (no copies: the tensors of corelm.quant's layers):
//   int4  q (N, K/2) uint8: per block of 32 columns, byte j holds q[j] (low nibble) and q[j+16]
//         (high) -- GGUF Q4_1's order; sz (N, K/G, 2) bf16: scale and zero of w = (q - 8)*scale + zero
//   int8  q (N, K) int8; s (N, K/G) bf16 (group-wise, G = 32 is GGUF Q8_0) or (N,) (per channel)
// The library is built once per instruction set by corelm/kernels/__init__.py: -mavx512bf16 on top of
// -mavx512vnni (VDPBF16PS for the many-token panel GEMM, gemm.h), -mavx512vnni (VPDPBUSD), -mavx2
// (VPMADDUBSW) or no flags (a scalar loop); #if blocks pick the path the flags allow.
//
// Registered with torch.library so torch.compile and the dispatcher see them:
//   corelm::qlinear(x (T, K) f32, q, s) -> (T, N) f32
//   corelm::qlinear_blocks(x (T, K) f32, blocks (N, row bytes) u8, ggml_type) -> (T, N) f32: GGUF's
//     Q8_0/Q4_K/Q5_K/Q6_K blocks as the file stores them (kquants.h)
//   corelm::qlinear_repacked(x, q, s) -> (T, N) f32: the few-row path on rows interleaved eight at a
//     time (repack.h), as DecoderStep runs it; s is bf16 scales or the one-element GGML type
//   corelm::repack_blocks(blocks (N, row bytes) u8, ggml_type) -> 1-D u8: those rows as repack.h's records
//     (empty: the type has none); corelm::unpack_blocks(packed, ggml_type, n, k) -> (n, row bytes) u8 back;
//     corelm::unpack_rows(packed, ggml_type, n, k, ids) -> (len(ids), row bytes) u8: some of them;
//     corelm::qlinear_packed(x, packed, ggml_type, n) -> (T, N) f32 on the records alone (qlinear.h)
//   corelm::attention(q (N, H*hd) f32, k_cache, v_cache (B, KV, S, hd), rows, pos (N,) i64, window, scale,
//     softcap) -> (N, H*hd) f32: one layer's causal attention over the step's caches (attention.h)
//   torch.classes.corelm.DecoderStep: a decoder (llama family, Gemma, OLMo 2, MoE) described once by
//     named tensors, whose forward runs N tokens (each with its own cache row and position) through
//     every block and the head in one call: a batched decode step, a prefill, or a speculative verify.
//
// The source is split by job: pool.h (the thread pool), dot.h (activation quantization and the
// SIMD dot products), qlinear.h (quantized matrices and their matmul), gemm.h (the many-token panel
// GEMM), attention.h (attention over the KV caches), decoder_step.h (the fused model step). This file registers the operators; it is the one
// translation unit the build compiles.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>

#include "decoder_step.h"
#include "dot.h"
#include "qlinear.h"

namespace corelm {
namespace {

const char* isa_name() {
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512bf16";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

std::string isa() { return isa_name(); }

// The panel GEMM's arithmetic for this call (gemm.h): "fp32", "bf16" or "aten".
std::string gemm() {
  switch (gemm_mode()) {
    case Gemm::BF16: return "bf16";
    case Gemm::I16: return "int16";
    case Gemm::I8: return "int8";
    case Gemm::AMX: return "amx";
    case Gemm::AMXEmulated: return "amx-emulated";
    case Gemm::ATen: return "aten";
    default: return "fp32";
  }
}

// The decode kernels' prefetch distance for this call, in bytes (qlinear.h's prefetch_ahead): 0 is off.
int64_t prefetch() { return prefetch_ahead(); }

}  // namespace
}  // namespace corelm

using corelm::attention;
using corelm::DecoderStep;
using corelm::gemm;
using corelm::isa;
using corelm::prefetch;
using corelm::qlinear;
using corelm::qlinear_blocks;
using corelm::qlinear_packed;
using corelm::qlinear_repacked;
using corelm::repack_blocks;
using corelm::repack_rows;
using corelm::unpack_blocks;
using corelm::unpack_rows;

TORCH_LIBRARY(corelm, m) {
  m.def("qlinear(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("qlinear_blocks(Tensor x, Tensor blocks, int ggml_type) -> Tensor");
  m.def("qlinear_repacked(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("repack_blocks(Tensor blocks, int ggml_type) -> Tensor");
  m.def("repack_rows(Tensor q, Tensor s) -> Tensor");
  m.def("unpack_blocks(Tensor packed, int ggml_type, int n, int k) -> Tensor");
  m.def("unpack_rows(Tensor packed, int ggml_type, int n, int k, Tensor ids) -> Tensor");
  m.def("qlinear_packed(Tensor x, Tensor packed, int ggml_type, int n) -> Tensor");
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor pos, int window, float scale, "
        "float softcap) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("gemm() -> str", &gemm);
  m.def("prefetch() -> int", &prefetch);
  // amx.h's first look at the tiles (0 they agree with their C emulation, 1 none, 2 they disagree), and the
  // switch Python throws once a child process's look found 0 (corelm/kernels/__init__.py)
  m.def("amx_check() -> int", &corelm::amx_probe);
  m.def("amx_enable() -> bool", &corelm::amx_turn_on);
  m.def("pool_probe(int sleep_us, int caller_us=100) -> int[]", &corelm::pool_probe);
  m.class_<DecoderStep>("DecoderStep")
      .def(torch::init<c10::Dict<std::string, at::Tensor>, int64_t, int64_t, c10::Dict<std::string, double>>())
      .def("add_layer", &DecoderStep::add_layer)
      .def("n_layers", &DecoderStep::n_layers)
      .def("set_lora", &DecoderStep::set_lora)
      .def("forward",
           [](const c10::intrusive_ptr<DecoderStep>& self, const at::Tensor& x, const at::Tensor& rows,
              const at::Tensor& pos, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out) {
             return self->forward(x, rows, pos, k_cache, v_cache, out);
           })
      .def("forward_lora", &DecoderStep::forward);
}

TORCH_LIBRARY_IMPL(corelm, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("qlinear_blocks", &qlinear_blocks);
  m.impl("qlinear_repacked", &qlinear_repacked);
  m.impl("repack_blocks", &repack_blocks);
  m.impl("repack_rows", &repack_rows);
  m.impl("unpack_blocks", &unpack_blocks);
  m.impl("unpack_rows", &unpack_rows);
  m.impl("qlinear_packed", &qlinear_packed);
  m.impl("attention", &attention);
}
