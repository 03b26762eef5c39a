// Quantized matrices and the matmul every kernel uses: integer dot products for a few rows, a
// dequantized-panel GEMM for many (included once, by corelm_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "dot.h"
#include "kquants.h"
#include "pool.h"
#include "repack.h"

namespace corelm {

// A quantized weight matrix (see the file comment for the layouts).
struct QMatrix {
  const uint8_t* q = nullptr;
  const uint16_t* s = nullptr;
  int64_t n = 0, k = 0, row_q = 0, row_s = 0, bpg = 1;
  Kind kind = Kind::Q8;
  // the rows interleaved eight at a time (repack.h), for the few-row matmul; null: not repacked
  std::shared_ptr<const uint8_t> packed;
  int64_t group_bytes = 0;
  Row row(int64_t i) const { return {q + i * row_q, s + i * row_s, bpg}; }
};

// m with its rows also interleaved eight at a time (repack.h), when its kind has a repacked kernel;
// CORELM_REPACK=0 turns it off. The copy is as large as the matrix: the original rows stay for the
// many-row GEMM and for the layers themselves.
QMatrix repacked(QMatrix m) {
  const char* env = std::getenv("CORELM_REPACK");
  if ((env != nullptr && std::string(env) == "0") || packed_record(m.kind) == 0 || m.n == 0) return m;
  const int64_t nb = m.k / QK, groups = (m.n + kGroup - 1) / kGroup;
  if ((m.kind == Kind::Q4_K || m.kind == Kind::Q6_K) && nb % 8 != 0) return m;
  m.group_bytes = packed_group_bytes(m.kind, nb);
  const int64_t bytes = groups * m.group_bytes;
  uint8_t* buf = static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
  TORCH_CHECK(buf != nullptr, "out of memory repacking a ", m.n, " x ", m.k, " matrix");
  std::memset(buf, 0, bytes);
  const QMatrix& src = m;
  Pool::parallel_for(groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      repack_group(src.kind, nb, src.bpg, std::min(kGroup, src.n - g * kGroup),
                   [&](int64_t r) { return src.row(g * kGroup + r); }, buf + g * src.group_bytes);
  });
  m.packed = std::shared_ptr<const uint8_t>(buf, [](const uint8_t* p) { std::free(const_cast<uint8_t*>(p)); });
  return m;
}

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

// One weight row against the activation rows, up to eight per pass (a batched decode step's): the
// row's blocks are loaded and unpacked once for all of them.
inline void row_dots(const QMatrix& m, const QActs& a, int64_t r, float* out) {
  const Row w = m.row(r);
  const int64_t nb = a.k / QK;
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
    for (int64_t t = 0; t < nt; ++t) out[(t0 + t) * m.n + r] = y[t];
  }
}

void qmatmul_packed(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs);

// Several matrices reading the same input (q|k|v, gate|up) as one: outs[i] gets (T, N_i). The output
// rows of all of them are split across the intra-op threads, each weight row read once.
void qmatmul(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs) {
  for (const auto& m : ms)
    if (m.packed) return qmatmul_packed(a, ms, outs);
  int64_t total = 0;
  for (const auto& m : ms) total += m.n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, (total + 4 * threads - 1) / (4 * threads));  // 4 per thread
  Pool::parallel_for(total, chunk, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    int64_t base = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= base + ms[i].n) base += ms[i++].n;
      row_dots(ms[i], a, r - base, outs[i]);
    }
  });
}

// qmatmul over groups of eight output rows: a repacked matrix's group goes through packed_dot (up to
// four activation rows per pass over its record), any other matrix's eight rows through row_dots.
void qmatmul_packed(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs) {
  int64_t total = 0;
  for (const auto& m : ms) total += (m.n + kGroup - 1) / kGroup;
  const int64_t nb = a.k / QK, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(2, (total + 4 * threads - 1) / (4 * threads));  // 4 per thread
  Pool::parallel_for(total, chunk, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    int64_t base = 0;
    for (int64_t g = begin; g < end; ++g) {
      while (g >= base + (ms[i].n + kGroup - 1) / kGroup) base += (ms[i++].n + kGroup - 1) / kGroup;
      const QMatrix& m = ms[i];
      const int64_t r0 = (g - base) * kGroup, rows = std::min(kGroup, m.n - r0);
      if (!m.packed) {
        for (int64_t r = r0; r < r0 + rows; ++r) row_dots(m, a, r, outs[i]);
        continue;
      }
      const uint8_t* p = m.packed.get() + (g - base) * m.group_bytes;
      for (int64_t t0 = 0; t0 < a.t; t0 += 4) {
        ActRow act[4];
        float y[4 * kGroup];
        const int64_t nt = std::min<int64_t>(4, a.t - t0);
        for (int64_t t = 0; t < nt; ++t) act[t] = a.row(t0 + t);
        switch (nt) {
          case 1: packed_dot<1>(m.kind, p, act, nb, y); break;
          case 2: packed_dot<2>(m.kind, p, act, nb, y); break;
          case 3: packed_dot<3>(m.kind, p, act, nb, y); break;
          default: packed_dot<4>(m.kind, p, act, nb, y); break;
        }
        for (int64_t t = 0; t < nt; ++t)
          std::memcpy(outs[i] + (t0 + t) * m.n + r0, y + t * kGroup, rows * sizeof(float));
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

// Many tokens (a long prompt's prefill, perplexity windows): the weights are dequantized once, 32
// output rows at a time, into a K x 32 fp32 panel (transposed: one k's 32 weights are one or two
// vectors), and a register-tiled fp32 GEMM multiplies every token by it (tiles of 6 tokens x 32
// outputs on AVX-512: 12 accumulators, 12 FMAs per two loads). The panels are split across corelm's
// pool, like the integer kernels: ATen's OpenMP GEMM stalls at every call when a neighbour holds a
// core (measured on the 2-core Zen 4 at load 12: 6-8 tok/s for a 64-token SmolLM2 prefill, against
// 46 on the integer kernels). Sums are fp32, in k order: a panel's result equals x @ W^T to fp32
// rounding (tests/test_kquants.py, tests/test_kernels.py). An AMX-BF16/INT8 tile kernel would slot in
// beside panel_tiles, chosen from the CPU's flags (amx_bf16, amx_int8) the same way the build level is,
// once a machine with AMX can test it.
constexpr int64_t kPanel = 32;  // output rows per panel

#if defined(__AVX512F__)
constexpr int kTileRows = 6;
template <int NT>
void panel_tile(const float* x, int64_t K, const float* p, float* y, int64_t ldy) {
  __m512 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(p + k * kPanel), w1 = _mm512_loadu_ps(p + k * kPanel + 16);
    for (int t = 0; t < NT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * K + k]);
      acc[t][0] = _mm512_fmadd_ps(xb, w0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(xb, w1, acc[t][1]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_ps(y + t * ldy, acc[t][0]);
    _mm512_storeu_ps(y + t * ldy + 16, acc[t][1]);
  }
}
#elif defined(__AVX2__)
constexpr int kTileRows = 3;
template <int NT>
void panel_tile(const float* x, int64_t K, const float* p, float* y, int64_t ldy) {
  __m256 acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 4; ++v) acc[t][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 w[4];
    for (int v = 0; v < 4; ++v) w[v] = _mm256_loadu_ps(p + k * kPanel + 8 * v);
    for (int t = 0; t < NT; ++t) {
      const __m256 xb = _mm256_set1_ps(x[t * K + k]);
      for (int v = 0; v < 4; ++v) acc[t][v] = _mm256_fmadd_ps(xb, w[v], acc[t][v]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(y + t * ldy + 8 * v, acc[t][v]);
}
#else
constexpr int kTileRows = 4;
template <int NT>
void panel_tile(const float* x, int64_t K, const float* p, float* y, int64_t ldy) {
  float acc[NT][kPanel] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int t = 0; t < NT; ++t)
      for (int64_t j = 0; j < kPanel; ++j) acc[t][j] += x[t * K + k] * p[k * kPanel + j];
  for (int t = 0; t < NT; ++t)
    for (int64_t j = 0; j < kPanel; ++j) y[t * ldy + j] = acc[t][j];
}
#endif

// y (T, kPanel) with row stride ldy = x (T, K) @ panel (K, kPanel), kTileRows tokens at a time.
void panel_tiles(const float* x, int64_t T, int64_t K, const float* p, float* y, int64_t ldy) {
  int64_t t0 = 0;
  for (; t0 + kTileRows <= T; t0 += kTileRows) panel_tile<kTileRows>(x + t0 * K, K, p, y + t0 * ldy, ldy);
  switch (T - t0) {  // the last few tokens
#if defined(__AVX512F__)
    case 5: panel_tile<5>(x + t0 * K, K, p, y + t0 * ldy, ldy); break;
    case 4: panel_tile<4>(x + t0 * K, K, p, y + t0 * ldy, ldy); break;
    case 3: panel_tile<3>(x + t0 * K, K, p, y + t0 * ldy, ldy); break;
#elif !defined(__AVX2__)
    case 3: panel_tile<3>(x + t0 * K, K, p, y + t0 * ldy, ldy); break;
#endif
    case 2: panel_tile<2>(x + t0 * K, K, p, y + t0 * ldy, ldy); break;
    case 1: panel_tile<1>(x + t0 * K, K, p, y + t0 * ldy, ldy); break;
    default: break;
  }
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
  int64_t panels = 0;
  for (const auto& m : ms) panels += (m.n + kPanel - 1) / kPanel;
  Pool::parallel_for(panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K), panel(K * kPanel), y(T * kPanel);
    for (int64_t pi = begin; pi < end; ++pi) {
      size_t i = 0;
      int64_t first = pi;
      while (first >= (ms[i].n + kPanel - 1) / kPanel) first -= (ms[i++].n + kPanel - 1) / kPanel;
      const QMatrix& m = ms[i];
      const int64_t n0 = first * kPanel, cols = std::min(kPanel, m.n - n0);
      std::fill(panel.begin(), panel.end(), 0.f);
      for (int64_t c = 0; c < cols; ++c) {  // dequantize, transposed: panel[k][c] = W[n0 + c][k]
        dequantize_row(m, n0 + c, row.data());
        for (int64_t k = 0; k < K; ++k) panel[k * kPanel + c] = row[k];
      }
      panel_tiles(x, T, K, panel.data(), y.data(), kPanel);
      for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, &y[t * kPanel], cols * sizeof(float));
    }
  });
}

at::Tensor qlinear_matrix(const at::Tensor& xc, const QMatrix& m) {
  QActs acts;
  at::Tensor y = at::empty({xc.size(0), m.n}, xc.options());
  matmul(xc.data_ptr<float>(), xc.size(0), xc.size(1), {m}, {y.data_ptr<float>()}, acts);
  return y;
}

// The few-row path on m's repacked rows, whatever T is (tests compare it with the references).
at::Tensor qlinear_repacked(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  const QMatrix m = repacked(as_matrix(q, s, xc.size(1)));
  QActs acts;
  at::Tensor y = at::empty({xc.size(0), m.n}, xc.options());
  acts.set(xc.data_ptr<float>(), xc.size(0), xc.size(1));
  qmatmul(acts, {m}, {y.data_ptr<float>()});
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
