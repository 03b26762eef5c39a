// Quantized matrices and the matmul every kernel uses: integer dot products for a few rows, a
// dequantized-panel GEMM for many (gemm.h; included once, by corelm_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "dot.h"
#include "fgemv.h"
#include "gemm.h"
#include "kquants.h"
#include "pool.h"
#include "repack.h"

namespace corelm {

// A quantized weight matrix (see the file comment for the layouts). A GGUF block matrix may be kept
// repacked only (as_matrix_packed): ``packed`` set and ``q`` null; its rows are then read through
// panel_rows, never row().
struct QMatrix {
  const uint8_t* q = nullptr;
  const uint16_t* s = nullptr;
  int64_t n = 0, k = 0, row_q = 0, row_s = 0, bpg = 1;
  Kind kind = Kind::Q8;
  // the rows interleaved eight at a time (repack.h), for the few-row matmul; null: not repacked
  std::shared_ptr<const uint8_t> packed;
  int64_t group_bytes = 0;
  FRows f;  // set: a float matrix (fgemv.h), fp32 or bf16 rows and no quantized values
  Row row(int64_t i) const { return {q + i * row_q, s + i * row_s, bpg}; }
};

// Whether m's rows have a repacked form (repack.h) to run on: a kind with a record, whole super-blocks
// of eight for the K-quants. CORELM_REPACK=0 says no, 1 yes; unset, the builds with vectors (AVX2 and
// up) repack and the generic build does not: its scalar record loops decode at half the speed of its row
// kernels (embedded Q4_1, 1 thread, Zen 4: 4.7 against 9.0 tok/s; Q4_K_M 4.1 against 7.5).
inline bool repackable(const QMatrix& m) {
  const char* env = std::getenv("CORELM_REPACK");
#if defined(__AVX2__)
  const bool wanted = env == nullptr || std::string(env) != "0";
#else
  const bool wanted = env != nullptr && std::string(env) == "1";
#endif
  if (!wanted || m.f || packed_record(m.kind) == 0 || m.n == 0) return false;
  return !super_block_record(m.kind) || (m.k / QK) % 8 == 0;
}

// m's rows interleaved eight at a time (repack.h) as one uint8 tensor, a group's record after another
// (packed_group_bytes each); undefined when !repackable(m).
at::Tensor repack_matrix(const QMatrix& m) {
  if (!repackable(m)) return at::Tensor();
  const int64_t nb = m.k / QK, groups = (m.n + kGroup - 1) / kGroup, group_bytes = packed_group_bytes(m.kind, nb);
  at::Tensor out = at::zeros({groups * group_bytes}, at::kByte);  // rows past n stay zero
  uint8_t* buf = out.data_ptr<uint8_t>();
  Pool::parallel_for(groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      repack_group(m.kind, nb, m.bpg, std::min(kGroup, m.n - g * kGroup),
                   [&](int64_t r) { return m.row(g * kGroup + r); }, buf + g * group_bytes);
  });
  return out;
}

// A pointer into t's bytes that keeps t (its storage) alive: the matrix points into a tensor it does not copy.
inline std::shared_ptr<const uint8_t> hold(const at::Tensor& t) {
  return std::shared_ptr<const uint8_t>(std::make_shared<at::Tensor>(t), t.data_ptr<uint8_t>());
}

// m with its rows also interleaved eight at a time (repack.h), when repackable(m): a copy as large as the
// matrix, next to the original rows (a layer that keeps only its repacked bytes hands them over instead:
// as_matrix_packed; such a matrix is returned as it is).
QMatrix repacked(QMatrix m) {
  if (m.packed) return m;
  const at::Tensor p = repack_matrix(m);
  if (!p.defined()) return m;
  m.group_bytes = packed_group_bytes(m.kind, m.k / QK);
  m.packed = hold(p);
  return m;
}

// A matrix in one of GGUF's block formats (kquants.h): ``blocks`` (N, row bytes) uint8 holds each
// row's blocks as the file stores them, ``ggml_type`` names the format (2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0,
// 12 Q4_K, 13 Q5_K, 14 Q6_K, 20 IQ4_NL, 23 IQ4_XS).
QMatrix as_matrix_blocks(const at::Tensor& blocks, int64_t ggml_type, int64_t k) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
                  blocks.dim() == 2,
              "GGUF blocks must be a contiguous (N, row bytes) uint8 CPU tensor");
  QMatrix m;
  const int64_t row = ggml_type < CORELM_INT4 ? block_row_bytes(ggml_type, k, &m.kind) : 0;
  TORCH_CHECK(row > 0, "GGML type ", ggml_type, " with ", k, " columns has no kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL: k % 32 == 0; Q4_K, ",
              "Q5_K, Q6_K, IQ4_XS: k % 256 == 0)");
  TORCH_CHECK(blocks.size(1) == row, "a row of ", k, " values of GGML type ", ggml_type, " is ", row,
              " bytes, not ", blocks.size(1));
  m.n = blocks.size(0);
  m.k = k;
  m.q = blocks.data_ptr<uint8_t>();
  m.row_q = row;
  return m;
}

// Columns of a GGUF block matrix whose rows are ``row`` bytes (its type has kind *kind).
inline int64_t block_columns(int64_t ggml_type, int64_t row, Kind* kind) {
  const int64_t per = block_row_bytes(ggml_type, QK_K, kind);  // bytes per 256 values (every type divides it)
  TORCH_CHECK(per > 0, "GGML type ", ggml_type, " has no block kernel");
  const int64_t k = row * QK_K / per;
  TORCH_CHECK(k > 0 && block_row_bytes(ggml_type, k, kind) == row, "rows of ", row, " bytes are not whole blocks of GGML type ",
              ggml_type);
  return k;
}

// An n x k GGUF block matrix kept only repacked: ``packed`` is repack_blocks' uint8 tensor (the matrix
// points into it, no copy), ``q`` stays null.
QMatrix as_matrix_packed(const at::Tensor& packed, int64_t ggml_type, int64_t n, int64_t k) {
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.dim() == 1,
              "repacked GGUF blocks must be a contiguous 1-D uint8 CPU tensor");
  QMatrix m;
  m.row_q = block_row_bytes(ggml_type, k, &m.kind);
  TORCH_CHECK(m.row_q > 0, "GGML type ", ggml_type, " with ", k, " columns has no kernel");
  m.n = n;
  m.k = k;
  TORCH_CHECK(n > 0 && packed_record(m.kind) != 0 && (!super_block_record(m.kind) || (k / QK) % 8 == 0),
              "GGML type ", ggml_type, " with ", k, " columns has no repacked form");
  m.group_bytes = packed_group_bytes(m.kind, k / QK);
  TORCH_CHECK(packed.numel() == (n + kGroup - 1) / kGroup * m.group_bytes, "repacked bytes of a ", n, " x ", k,
              " matrix of GGML type ", ggml_type, " are ", (n + kGroup - 1) / kGroup * m.group_bytes, ", not ",
              packed.numel());
  m.packed = hold(packed);
  return m;
}

// Rows n0 .. n0 + cols - 1 (a panel of gemm.h: n0 a multiple of kGroup, cols <= kPanel) of m as a
// matrix whose row(c) is m's row n0 + c: m's own rows, or, for a matrix kept only repacked, its groups
// unpacked into a buffer of the calling thread's (valid until that thread's next call). panel_matmul
// reads every row through here.
inline QMatrix panel_rows(const QMatrix& m, int64_t n0, int64_t cols) {
  QMatrix v;
  v.kind = m.kind;
  v.n = cols;
  v.k = m.k;
  v.bpg = m.bpg;
  v.row_q = m.row_q;
  v.row_s = m.row_s;
  if (m.q != nullptr) {
    v.q = m.q + n0 * m.row_q;
    v.s = m.s == nullptr ? nullptr : m.s + n0 * m.row_s;
    return v;
  }
  TORCH_CHECK(m.packed && n0 % kGroup == 0 && cols <= kPanel, "a matrix without rows");
  uint8_t* buf = scratch<uint8_t, 4>(kPanel * m.row_q);
  const uint8_t* p = m.packed.get() + n0 / kGroup * m.group_bytes;
  for (int64_t g = 0; g * kGroup < cols; ++g)
    unpack_group(m.kind, m.k / QK, std::min(kGroup, cols - g * kGroup), p + g * m.group_bytes,
                 [&](int64_t r) { return buf + (g * kGroup + r) * m.row_q; });
  v.q = buf;
  if (m.kind == Kind::Q4 || m.kind == Kind::Q8) {  // CORELM_INT4/INT8 rows: each row's scales after its values
    v.s = reinterpret_cast<const uint16_t*>(buf + (m.kind == Kind::Q4 ? m.k / 2 : m.k));
    v.row_s = m.row_q / 2;
    v.bpg = 1;
  }
  return v;
}

// The matrix a layer's (values, scales) describe. For GGUF block formats the scales live in the
// blocks, and ``s`` is a one-element int64 tensor naming the GGML type (see as_matrix_blocks). fp32 or
// bf16 values are a float matrix (fgemv.h; ``s`` is not read: an nn.Linear's weight and no scales).
QMatrix as_matrix(const at::Tensor& q, const at::Tensor& s, int64_t k) {
  if (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) {
    QMatrix m;
    m.f = as_frows(q, k);
    m.n = m.f.n;
    m.k = k;
    return m;
  }
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu() && q.is_contiguous() && s.is_contiguous(),
              "quantized weights must be contiguous CPU tensors");
  TORCH_CHECK(k % QK == 0, "input width ", k, " is not a multiple of 32");
  if (s.scalar_type() == at::kLong) {  // (type): the rows of blocks; (type, n): repacked only
    TORCH_CHECK(s.numel() == 1 || s.numel() == 2, "a GGUF block format is named by its int64 GGML type (and rows)");
    const int64_t* ts = s.data_ptr<int64_t>();
    return s.numel() == 1 ? as_matrix_blocks(q, ts[0], k) : as_matrix_packed(q, ts[0], ts[1], k);
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

// From this many tokens on, a matmul runs on dequantized panels; fewer tokens (decode steps,
// speculative verify passes) stay on the integer kernels, whose rows equal one-token calls bit for
// bit. CORELM_GEMM_ROWS overrides it (read at every call: benchmarks/prefill.py compares the paths).
inline int64_t gemm_rows() {
  const char* v = std::getenv("CORELM_GEMM_ROWS");
  return v != nullptr ? std::max<int64_t>(1, std::atoll(v)) : int64_t(64);
}

void qmatmul_packed(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs);

// Several matrices reading the same input (q|k|v, gate|up) as one: outs[i] gets (T, N_i). The output
// rows of all of them are split across the intra-op threads, each weight row read once.
void qmatmul(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs) {
  for (const auto& m : ms)
    if (m.packed) return qmatmul_packed(a, ms, outs);
  for (const auto& m : ms) TORCH_CHECK(m.q != nullptr || m.n == 0, "a quantized matrix without rows");
  for_each_row(ms, [&](size_t i, int64_t r) { row_dots(ms[i], a, r, outs[i]); });
}

// qmatmul over groups of eight output rows: a repacked matrix's group goes through packed_dot (up to
// four activation rows per pass over its record), any other matrix's eight rows through row_dots.
void qmatmul_packed(const QActs& a, const std::vector<QMatrix>& ms, const std::vector<float*>& outs) {
  int64_t total = 0;
  for (const auto& m : ms) total += (m.n + kGroup - 1) / kGroup;
  const int64_t nb = a.k / QK, threads = std::max<int64_t>(1, at::get_num_threads()), ahead = prefetch_ahead();
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
          case 1: packed_dot<1>(m.kind, p, act, nb, y, ahead); break;
          case 2: packed_dot<2>(m.kind, p, act, nb, y, ahead); break;
          case 3: packed_dot<3>(m.kind, p, act, nb, y, ahead); break;
          default: packed_dot<4>(m.kind, p, act, nb, y, ahead); break;
        }
        for (int64_t t = 0; t < nt; ++t)
          std::memcpy(outs[i] + (t0 + t) * m.n + r0, y + t * kGroup, rows * sizeof(float));
      }
    }
  });
}

// y_i (T, N_i) = x (T, K) @ W_i^T for every matrix in ms.
void matmul(const float* x, int64_t T, int64_t K, const std::vector<QMatrix>& ms, const std::vector<float*>& outs,
            QActs& acts) {
  if (std::any_of(ms.begin(), ms.end(), [](const QMatrix& m) { return bool(m.f); })) {  // float weights: fgemv.h
    if (!std::all_of(ms.begin(), ms.end(), [](const QMatrix& m) { return bool(m.f); })) {
      for (size_t i = 0; i < ms.size(); ++i) matmul(x, T, K, {ms[i]}, {outs[i]}, acts);  // a mix: one at a time
      return;
    }
    std::vector<FRows> fs;
    for (const auto& m : ms) fs.push_back(m.f);
    return fmatmul(x, T, K, fs, outs, T >= gemm_rows(), prefetch_ahead());
  }
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

// The few-row path on m's repacked rows, whatever T is (tests compare it with the references).
at::Tensor qlinear_repacked(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  const QMatrix m = repacked(as_matrix(q, s, xc.size(1)));
  TORCH_CHECK(!m.f, "float weights have no repacked form");
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

// The repacked bytes of a GGUF block matrix (repack.h) as one uint8 tensor, or an empty tensor when its
// type (or width: K-quants need whole super-blocks of eight) has no repacked form, or CORELM_REPACK=0.
at::Tensor repack_blocks(const at::Tensor& blocks, int64_t ggml_type) {
  TORCH_CHECK(blocks.dim() == 2, "GGUF blocks must be (N, row bytes)");
  Kind kind;
  const at::Tensor p = repack_matrix(as_matrix_blocks(blocks, ggml_type, block_columns(ggml_type, blocks.size(1), &kind)));
  return p.defined() ? p : at::empty({0}, at::kByte);
}

// The repacked bytes (repack.h) of corelm's own int4 or int8 matrix (as_matrix's (q, s): int4 (N, K/2)
// nibbles and (N, K/G, 2) bf16 scale and zero; int8 (N, K) and (N,) or (N, K/G) bf16 scales), which
// qlinear_packed and the decode step read with the type CORELM_INT4 or CORELM_INT8 (kquants.h); an empty
// tensor where repack_blocks would give one.
at::Tensor repack_rows(const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.dim() == 2 && (q.scalar_type() == at::kByte || q.scalar_type() == at::kChar),
              "int4 (N, K/2) uint8 or int8 (N, K) int8 values");
  const QMatrix m = as_matrix(q, s, q.scalar_type() == at::kByte ? 2 * q.size(1) : q.size(1));
  const at::Tensor p = repack_matrix(m);
  return p.defined() ? p : at::empty({0}, at::kByte);
}

// The inverse of repack_blocks: the (n, row bytes) uint8 rows of an n x k matrix, bit for bit the file's.
at::Tensor unpack_blocks(const at::Tensor& packed, int64_t ggml_type, int64_t n, int64_t k) {
  const QMatrix m = as_matrix_packed(packed, ggml_type, n, k);
  at::Tensor out = at::empty({n, m.row_q}, at::kByte);
  uint8_t* rows = out.data_ptr<uint8_t>();
  Pool::parallel_for((n + kGroup - 1) / kGroup, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      unpack_group(m.kind, k / QK, std::min(kGroup, n - g * kGroup), m.packed.get() + g * m.group_bytes,
                   [&](int64_t r) { return rows + (g * kGroup + r) * m.row_q; });
  });
  return out;
}

// Rows ``ids`` (1-D int64) of an n x k matrix kept only repacked, as (len(ids), row bytes) uint8, the file's
// bytes: a token embedding that shares a tied head's records looks its rows up here (a group unpacked a row).
at::Tensor unpack_rows(const at::Tensor& packed, int64_t ggml_type, int64_t n, int64_t k, const at::Tensor& ids) {
  const QMatrix m = as_matrix_packed(packed, ggml_type, n, k);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.device().is_cpu(), "ids must be 1-D int64 on CPU");
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  at::Tensor out = at::empty({idc.numel(), m.row_q}, at::kByte);
  uint8_t* rows = out.data_ptr<uint8_t>();
  std::vector<uint8_t> spare(m.row_q);  // the group's other rows
  for (int64_t i = 0; i < idc.numel(); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < n, "row ", id[i], " of a matrix of ", n);
    const int64_t g = id[i] / kGroup, want = id[i] % kGroup;
    unpack_group(m.kind, k / QK, std::min(kGroup, n - g * kGroup), m.packed.get() + g * m.group_bytes,
                 [&](int64_t r) { return r == want ? rows + i * m.row_q : spare.data(); });
  }
  return out;
}

// y (T, N) = x (T, K) @ W^T for W kept only repacked (repack_blocks of its n rows): the few-row kernels on
// the records, the many-row GEMM on panels unpacked on the fly.
at::Tensor qlinear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t ggml_type, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  return qlinear_matrix(xc, as_matrix_packed(packed, ggml_type, n, xc.size(1)));
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be (T, K) float32 on CPU");
  const at::Tensor xc = x.contiguous();
  return qlinear_matrix(xc, as_matrix(q, s, xc.size(1)));
}

}  // namespace corelm
