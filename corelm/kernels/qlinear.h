// Quantized matrices and the matmul every kernel uses: integer dot products for a few rows, a
// dequantized-panel GEMM for many (included once, by corelm_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "dot.h"
#include "kquants.h"
#include "pool.h"

namespace corelm {

// A quantized weight matrix (see the file comment for the layouts).
struct QMatrix {
  const uint8_t* q = nullptr;
  const uint16_t* s = nullptr;
  int64_t n = 0, k = 0, row_q = 0, row_s = 0, bpg = 1;
  Kind kind = Kind::Q8;
  Row row(int64_t i) const { return {q + i * row_q, s + i * row_s, bpg}; }
};

// A matrix in one of GGUF's block formats (kquants.h): ``blocks`` (N, row bytes) uint8 holds each
// row's blocks as the file stores them, ``ggml_type`` names the format (6 Q5_0, 7 Q5_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K).
QMatrix as_matrix_blocks(const at::Tensor& blocks, int64_t ggml_type, int64_t k) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
                  blocks.dim() == 2,
              "GGUF blocks must be a contiguous (N, row bytes) uint8 CPU tensor");
  QMatrix m;
  const int64_t row = block_row_bytes(ggml_type, k, &m.kind);
  TORCH_CHECK(row > 0, "GGML type ", ggml_type, " with ", k, " columns has no kernel (Q5_0, Q5_1, Q8_0: k % 32 == 0; Q4_K, ",
              "Q5_K, Q6_K: k % 256 == 0)");
  TORCH_CHECK(blocks.size(1) == row, "a row of ", k, " values of GGML type ", ggml_type, " is ", row,
              " bytes, not ", blocks.size(1));
  m.n = blocks.size(0);
  m.k = k;
  m.q = blocks.data_ptr<uint8_t>();
  m.row_q = row;
  return m;
}

// The matrix a layer's (values, scales) describe. For GGUF block formats the scales live in the
// blocks, and ``s`` is a one-element int64 tensor naming the GGML type (see as_matrix_blocks).
QMatrix as_matrix(const at::Tensor& q, const at::Tensor& s, int64_t k) {
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu() && q.is_contiguous() && s.is_contiguous(),
              "quantized weights must be contiguous CPU tensors");
  TORCH_CHECK(k % QK == 0, "input width ", k, " is not a multiple of 32");
  if (s.scalar_type() == at::kLong) {
    TORCH_CHECK(s.numel() == 1, "a GGUF block format is named by one int64 GGML type");
    return as_matrix_blocks(q, s.item<int64_t>(), k);
  }
  TORCH_CHECK(s.scalar_type() == at::kBFloat16, "weight scales must be bf16");
  QMatrix m;
  m.n = q.size(0);
  m.k = k;
  m.q = static_cast<const uint8_t*>(q.data_ptr());
  m.s = reinterpret_cast<const uint16_t*>(s.data_ptr());
  int64_t groups;
  if (q.scalar_type() == at::kByte) {  // int4: (N, K/2) nibbles, (N, K/G, 2) scale and zero
    TORCH_CHECK(q.dim() == 2 && q.size(1) * 2 == k && s.dim() == 3 && s.size(0) == m.n && s.size(2) == 2,
                "int4 weight must be (N, K/2) uint8 with (N, K/G, 2) scales and zeros");
    m.kind = Kind::Q4;
    m.row_q = k / 2;
    groups = s.size(1);
    m.row_s = 2 * groups;
  } else {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == k && s.size(0) == m.n && s.dim() <= 2,
                "int8 weight must be (N, K) int8 with (N, K/G) or (N,) scales");
    m.kind = Kind::Q8;
    m.row_q = k;
    groups = s.dim() == 2 ? s.size(1) : 1;
    m.row_s = groups;
  }
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % QK == 0,
              "scale groups must be whole multiples of 32 columns");
  m.bpg = k / groups / QK;
  return m;
}

// Activations of T rows, quantized once and shared by every output row.
struct QActs {
  std::vector<int8_t> qh, ql;
  std::vector<float> d, s;
  int64_t t = 0, k = 0;
  void set(const float* x, int64_t rows, int64_t width) {
    t = rows;
    k = width;
    qh.resize(rows * width);
    ql.resize(rows * width);
    d.resize(rows * width / QK);
    s.resize(rows * width / QK);
    for (int64_t r = 0; r < rows; ++r)
      quantize_row(x + r * width, width, qh.data() + r * width, ql.data() + r * width, d.data() + r * width / QK,
                   s.data() + r * width / QK);
  }
  ActRow row(int64_t r) const {
    return {qh.data() + r * k, ql.data() + r * k, d.data() + r * k / QK, s.data() + r * k / QK};
  }
};

// Several matrices reading the same input (q|k|v, gate|up) as one: outs[i] gets (T, N_i). The output
// rows of all of them are split across the intra-op threads, each weight row read once.
void qmatmul(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs) {
  int64_t total = 0;
  for (const auto& m : ms) total += m.n;
  const int64_t nb = a.k / QK, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, (total + 4 * threads - 1) / (4 * threads));  // 4 per thread
  Pool::parallel_for(total, chunk, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    int64_t base = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= base + ms[i].n) base += ms[i++].n;
      const QMatrix& m = ms[i];
      const Row w = m.row(r - base);
      // up to eight activation rows (a batched decode step's) per pass over the weights: the row's
      // blocks are loaded and unpacked once for all of them
      for (int64_t t0 = 0; t0 < a.t; t0 += 8) {
        ActRow act[8];
        float y[8];
        const int64_t nt = std::min<int64_t>(8, a.t - t0);
        for (int64_t t = 0; t < nt; ++t) act[t] = a.row(t0 + t);
        for (int64_t t = nt; t < 8; ++t) act[t] = act[nt - 1];
        switch (nt) {
          case 1: dot_rows<1>(m.kind, w, act, nb, y); break;
          case 2: dot_rows<2>(m.kind, w, act, nb, y); break;
          case 3: dot_rows<3>(m.kind, w, act, nb, y); break;
          case 4: dot_rows<4>(m.kind, w, act, nb, y); break;
          case 5:
          case 6: dot_rows<6>(m.kind, w, act, nb, y); break;  // 5: the sixth row repeats the fifth
          default: dot_rows<8>(m.kind, w, act, nb, y); break;  // 7: the eighth repeats the seventh
        }
        for (int64_t t = 0; t < nt; ++t) outs[i][(t0 + t) * m.n + r - base] = y[t];
      }
    }
  });
}

// Weight row r of m as fp32 (K,): q * scale (+ m for int4).
void dequantize_row(const QMatrix& m, int64_t r, float* out) {
  const Row w = m.row(r);
  if (m.kind != Kind::Q4 && m.kind != Kind::Q8) return dequantize_blocks(m.kind, w.q, m.k, out);
  for (int64_t b = 0; b < m.k / QK; ++b) {
    float* o = out + b * QK;
    if (m.kind == Kind::Q4) {
      const uint16_t* sz = w.s + 2 * (b / w.bpg);
      const float scale = bf16(sz[0]), shift = bf16(sz[1]) - 8.f * scale;
      const uint8_t* qs = w.q + b * QK / 2;
      for (int64_t j = 0; j < QK / 2; ++j) {
        o[j] = static_cast<float>(qs[j] & 0x0F) * scale + shift;
        o[j + QK / 2] = static_cast<float>(qs[j] >> 4) * scale + shift;
      }
    } else {
      const float scale = bf16(w.s[b / w.bpg]);
      const int8_t* qb = reinterpret_cast<const int8_t*>(w.q) + b * QK;
      for (int64_t j = 0; j < QK; ++j) o[j] = static_cast<float>(qb[j]) * scale;
    }
  }
}

// From this many tokens on, a matmul dequantizes panels of the weights and calls ATen's GEMM (a
// long prompt's prefill, perplexity windows); fewer tokens (decode steps, speculative verify
// passes) stay on the integer kernels, whose rows equal one-token calls bit for bit. The panels are
// bf16 when the CPU declares AVX512_BF16 and the build is the AVX-512 one (oneDNN's bf16 GEMM, ~2.4x
// the fp32 GEMM's FLOP/s on Zen 4), else fp32 (bf16 GEMMs without the instructions are a trap:
// 0.3 GFLOP/s on Zen 3). Measured on SmolLM2 (Zen 4, 2 threads; benchmarks/prefill.py), the integer
// kernels ran at 560/543/511/451 tok/s for 32/128/256/512 tokens and the fp32 GEMM at 231/376/439/454;
// see gemm_rows() for the bf16 figures. An AMX-BF16/INT8 tile path would slot in here, chosen the
// same way from the CPU's flags (amx-bf16 through oneDNN's bf16 GEMM already; amx-int8 as a tile
// kernel over repacked blocks), once a machine with AMX can test it.
bool bf16_gemm() {  // CORELM_GEMM_DTYPE=fp32|bf16 overrides the CPU's choice (benchmarks compare them)
  const char* v = std::getenv("CORELM_GEMM_DTYPE");
  if (v != nullptr) return std::string(v) == "bf16";
  static const bool bf16 = [] {
#if defined(__AVX512VNNI__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
#else
    return false;
#endif
  }();
  return bf16;
}

int64_t gemm_rows() {  // CORELM_GEMM_ROWS overrides the default threshold
  const char* v = std::getenv("CORELM_GEMM_ROWS");
  return v != nullptr ? std::max<int64_t>(1, std::atoll(v)) : (bf16_gemm() ? int64_t(64) : int64_t(512));
}
constexpr int64_t kPanelRows = 1024;

// y_i (T, N_i) = x (T, K) @ W_i^T for every matrix in ms.
void matmul(const float* x, int64_t T, int64_t K, const std::vector<QMatrix>& ms, const std::vector<float*>& outs,
            QActs& acts) {
  if (T < gemm_rows()) {
    acts.set(x, T, K);
    qmatmul(acts, ms, outs);
    return;
  }
  const bool bf16 = bf16_gemm();
  const at::Tensor x32 = at::from_blob(const_cast<float*>(x), {T, K}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor xt = bf16 ? x32.to(at::kBFloat16) : x32;
  at::Tensor panel = at::empty({kPanelRows, K}, xt.options());
  for (size_t i = 0; i < ms.size(); ++i) {
    const QMatrix& m = ms[i];
    for (int64_t n0 = 0; n0 < m.n; n0 += kPanelRows) {
      const int64_t rows = std::min(kPanelRows, m.n - n0);
      Pool::parallel_for(rows, 64, [&](int64_t b, int64_t e) {
        std::vector<float> row(bf16 ? K : 0);
        for (int64_t r = b; r < e; ++r) {
          if (!bf16) {
            dequantize_row(m, n0 + r, panel.data_ptr<float>() + r * K);
            continue;
          }
          dequantize_row(m, n0 + r, row.data());
          at::BFloat16* p = panel.data_ptr<at::BFloat16>() + r * K;
          for (int64_t j = 0; j < K; ++j) p[j] = at::BFloat16(row[j]);  // round to nearest even
        }
      });
      const at::Tensor y = at::mm(xt, panel.narrow(0, 0, rows).t()).to(at::kFloat);  // (T, rows)
      const float* yp = y.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, yp + t * rows, rows * sizeof(float));
    }
  }
}

at::Tensor qlinear_matrix(const at::Tensor& xc, const QMatrix& m) {
  QActs acts;
  at::Tensor y = at::empty({xc.size(0), m.n}, xc.options());
  matmul(xc.data_ptr<float>(), xc.size(0), xc.size(1), {m}, {y.data_ptr<float>()}, acts);
  return y;
}

// y (T, N) = x (T, K) @ W^T for W in GGUF block format ``ggml_type`` (see as_matrix_blocks).
at::Tensor qlinear_blocks(const at::Tensor& x, const at::Tensor& blocks, int64_t ggml_type) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  return qlinear_matrix(xc, as_matrix_blocks(blocks, ggml_type, xc.size(1)));
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  return qlinear_matrix(xc, as_matrix(q, s, xc.size(1)));
}

}  // namespace corelm
