// Quantized matrices and the matmul every kernel uses: integer dot products for a few rows, a
// dequantized-panel GEMM for many (gemm.h; included once, by corelm_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <vector>

#include "dot.h"
#include "gemm.h"
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

// From this many tokens on, a matmul runs on dequantized panels; fewer tokens (decode steps,
// speculative verify passes) stay on the integer kernels, whose rows equal one-token calls bit for
// bit. CORELM_GEMM_ROWS overrides it (read at every call: benchmarks/prefill.py compares the paths).
int64_t gemm_rows() {
  const char* v = std::getenv("CORELM_GEMM_ROWS");
  return v != nullptr ? std::max<int64_t>(1, std::atoll(v)) : int64_t(64);
}

// y_i (T, N_i) = x (T, K) @ W_i^T for every matrix in ms.
void matmul(const float* x, int64_t T, int64_t K, const std::vector<QMatrix>& ms, const std::vector<float*>& outs,
            QActs& acts) {
  if (T < gemm_rows()) {
    acts.set(x, T, K);
    qmatmul(acts, ms, outs);
    return;
  }
  panel_matmul(x, T, K, ms, outs);
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
