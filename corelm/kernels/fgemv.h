// Float weight matrices (fp32 or bf16 rows, no scales: a float checkpoint's nn.Linear weights, read in
// place) and their matmul on corelm's pool (included once, by qlinear.h, whose matmul() dispatches here).
//
// Few rows (a decode step, a speculative verify: T < gemm_rows()): a small GEMM in fp32 -- each weight
// row is converted to fp32 in registers (bf16 is the top half of an fp32: a 16-bit shift) and multiplied
// by up to four tokens with fp32 FMAs. Decode is bound by the bytes of weights read, so a bf16 matrix
// stays bf16 (half of fp32's bytes) and is never expanded in memory. Output (t, n) is always the same
// sequence of operations: the columns in chunks of L lanes (16 on AVX-512, 8 on AVX2 and the generic
// build), chunk c FMA'd into chain c % 2 in order (the columns past K as zeros), the two chains added and
// their lanes summed in one fixed tree -- whatever T is and whatever else is in the call, so a batched
// decode row equals the same row alone, bit for bit. (Builds differ in L, so they agree only to fp32
// rounding.)
//
// Many rows (a prefill): gemm.h's fp32 panels and register tiles, the panels filled by converting rows
// (the float kind's "dequantization"); gemm.h's int16 and bf16 arithmetics apply to quantized weights only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "gemm.h"
#include "pool.h"

namespace corelm {

enum class FKind : uint8_t { None, F32, BF16 };

// A float matrix (n, k): contiguous rows of fp32 or bf16 (the bf16 as raw 16-bit words).
struct FRows {
  const void* w = nullptr;
  FKind kind = FKind::None;
  int64_t n = 0, k = 0;
  explicit operator bool() const { return kind != FKind::None; }
};

// The float matrix a (N, K) fp32 or bf16 weight tensor is, without a copy (the caller keeps w alive).
inline FRows as_frows(const at::Tensor& w, int64_t k) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.size(1) == k,
              "a float weight must be a contiguous (N, ", k, ") CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "float weights must be float32 or bfloat16");
  FRows m;
  m.w = w.data_ptr();
  m.kind = w.scalar_type() == at::kFloat ? FKind::F32 : FKind::BF16;
  m.n = w.size(0);
  m.k = k;
  return m;
}

// Row r as fp32 (exact: bf16 -> fp32 appends 16 zero bits).
inline void frow_to_f32(const FRows& m, int64_t r, float* out) {
  if (m.kind == FKind::F32) {
    std::memcpy(out, static_cast<const float*>(m.w) + r * m.k, m.k * sizeof(float));
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(m.w) + r * m.k;
  for (int64_t i = 0; i < m.k; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(out + i, &bits, sizeof(float));
  }
}

// ---------------------------------------------------------------------------------------------------
// The few-row tile: y[t * ldy + r] = W[r] . x[t] for R weight rows (stride K) and NT tokens (stride ldx)
// (the driver runs R = 1; R > 1 shares each token load between rows).
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int64_t kFLanes = 16;

template <FKind KIND>
inline __m512 fload(const void* w, int64_t i) {
  if constexpr (KIND == FKind::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <FKind KIND>
inline __m512 fload_tail(const void* w, int64_t i, __mmask16 mask) {  // lanes past the mask are 0
  if constexpr (KIND == FKind::F32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Chunk c of 16 columns goes to chain c % 2 (two chains: one FMA's latency does not bound a lone row).
template <FKind KIND, int R, int NT>
inline void fchunk(const char* wb, int64_t K, int64_t wsize, const float* x, int64_t ldx, int64_t i,
                   __m512 (&acc)[R][NT]) {
  __m512 xv[NT];
  for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * ldx + i);
  for (int r = 0; r < R; ++r) {
    const __m512 wv = fload<KIND>(wb + r * K * wsize, i);
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
  }
}

template <FKind KIND, int R, int NT>
void ftile(const void* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t ahead) {
  const int64_t wsize = KIND == FKind::F32 ? 4 : 2;
  const char* wb = static_cast<const char*>(w);
  __m512 even[R][NT], odd[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) even[r][t] = odd[r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kFLanes <= K; i += 2 * kFLanes) {
    if (ahead != 0)
      for (int r = 0; r < R; ++r) prefetch_bytes(wb + (r * K + i) * wsize + ahead, 2 * kFLanes * wsize);
    fchunk<KIND, R, NT>(wb, K, wsize, x, ldx, i, even);
    fchunk<KIND, R, NT>(wb, K, wsize, x, ldx, i + kFLanes, odd);
  }
  if (i + kFLanes <= K) {
    fchunk<KIND, R, NT>(wb, K, wsize, x, ldx, i, even);
    i += kFLanes;
  }
  if (i < K) {  // the last K % 16 columns, the lanes past them zero, into the other chain
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - i)) - 1);
    auto& acc = (K / kFLanes) % 2 == 0 ? even : odd;
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_maskz_loadu_ps(mask, x + t * ldx + i);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = fload_tail<KIND>(wb + r * K * wsize, i, mask);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r][t], odd[r][t]));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kFLanes = 8;

template <FKind KIND>
inline __m256 fload(const void* w, int64_t i) {
  if constexpr (KIND == FKind::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

inline float fsum8(__m256 v) {  // the lanes in one fixed tree: (0+4, 1+5, 2+6, 3+7), then pairs
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 p = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}

template <FKind KIND, int R, int NT>
inline void fchunk(const char* wb, int64_t K, int64_t wsize, const float* x, int64_t ldx, int64_t i,
                   __m256 (&acc)[R][NT]) {
  __m256 xv[NT];
  for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + i);
  for (int r = 0; r < R; ++r) {
    const __m256 wv = fload<KIND>(wb + r * K * wsize, i);
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
  }
}

template <FKind KIND, int R, int NT>
void ftile(const void* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t ahead) {
  const int64_t wsize = KIND == FKind::F32 ? 4 : 2;
  const char* wb = static_cast<const char*>(w);
  __m256 acc[R][NT], odd[R][NT];  // chunk c of 8 columns goes to chain c % 2, as on AVX-512
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = odd[r][t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kFLanes <= K; i += 2 * kFLanes) {
    if (ahead != 0)
      for (int r = 0; r < R; ++r) prefetch_bytes(wb + (r * K + i) * wsize + ahead, 2 * kFLanes * wsize);
    fchunk<KIND, R, NT>(wb, K, wsize, x, ldx, i, acc);
    fchunk<KIND, R, NT>(wb, K, wsize, x, ldx, i + kFLanes, odd);
  }
  if (i + kFLanes <= K) {
    fchunk<KIND, R, NT>(wb, K, wsize, x, ldx, i, acc);
    i += kFLanes;
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_add_ps(acc[r][t], odd[r][t]);
  if (i < K) {  // the tail through zero-padded copies
    alignas(32) float xt[NT][kFLanes] = {};
    alignas(32) uint8_t wt[R][kFLanes * 4] = {};
    for (int t = 0; t < NT; ++t) std::memcpy(xt[t], x + t * ldx + i, (K - i) * sizeof(float));
    for (int r = 0; r < R; ++r) std::memcpy(wt[r], wb + (r * K + i) * wsize, (K - i) * wsize);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = fload<KIND>(wt[r], 0);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_fmadd_ps(wv, _mm256_load_ps(xt[t]), acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ldy + r] = fsum8(acc[r][t]);
}
#else
constexpr int64_t kFLanes = 8;

template <FKind KIND>
inline float fvalue(const void* w, int64_t i) {
  if constexpr (KIND == FKind::F32) {
    return static_cast<const float*>(w)[i];
  } else {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
}

template <FKind KIND, int R, int NT>
void ftile(const void* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t ahead) {
  const int64_t wsize = KIND == FKind::F32 ? 4 : 2;
  const char* wb = static_cast<const char*>(w);
  (void)ahead;
  for (int r = 0; r < R; ++r) {
    const void* wr = wb + r * K * wsize;
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + t * ldx;
      float acc[kFLanes] = {};
      for (int64_t i = 0; i < K; i += kFLanes)
        for (int64_t l = 0; l < kFLanes && i + l < K; ++l) acc[l] += fvalue<KIND>(wr, i + l) * xt[i + l];
      const float a = (acc[0] + acc[4]) + (acc[2] + acc[6]), b = (acc[1] + acc[5]) + (acc[3] + acc[7]);
      y[t * ldy + r] = a + b;
    }
  }
}
#endif

// Weight row r of m against the T tokens of x, four tokens per pass over the row. One row at a time:
// consecutive rows are one contiguous stream, which the hardware prefetchers follow (tiles of four rows
// side by side, four short streams, read about half the bandwidth on the 2-core Zen 4). The first pass
// also prefetches `ahead` bytes on (qlinear.h's prefetch_ahead; 0: not at all).
template <FKind KIND>
void frow_dot(const FRows& m, int64_t r, const float* x, int64_t T, float* y, int64_t ahead) {
  const int64_t K = m.k, wsize = KIND == FKind::F32 ? 4 : 2;
  const void* w = static_cast<const char*>(m.w) + r * K * wsize;
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const float* xt = x + t0 * K;
    float* yt = y + t0 * m.n + r;
    switch (std::min<int64_t>(4, T - t0)) {
      case 1: ftile<KIND, 1, 1>(w, K, xt, K, yt, m.n, t0 == 0 ? ahead : 0); break;
      case 2: ftile<KIND, 1, 2>(w, K, xt, K, yt, m.n, t0 == 0 ? ahead : 0); break;
      case 3: ftile<KIND, 1, 3>(w, K, xt, K, yt, m.n, t0 == 0 ? ahead : 0); break;
      default: ftile<KIND, 1, 4>(w, K, xt, K, yt, m.n, t0 == 0 ? ahead : 0); break;
    }
  }
}

// Several float matrices reading the same x (T, K) (q|k|v, gate|up) as one: outs[i] gets (T, N_i). The
// output rows of all of them are split across the pool, each weight row read once per call.
inline void fgemv(const float* x, int64_t T, int64_t K, const std::vector<FRows>& ms, const std::vector<float*>& outs,
                  int64_t ahead) {
  for_each_row(ms, [&](size_t i, int64_t r) {
    if (ms[i].kind == FKind::F32) {
      frow_dot<FKind::F32>(ms[i], r, x, T, outs[i], ahead);
    } else {
      frow_dot<FKind::BF16>(ms[i], r, x, T, outs[i], ahead);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Many rows: gemm.h's fp32 panels, filled from converted rows.
// ---------------------------------------------------------------------------------------------------
inline void fpanel_matmul(const float* x, int64_t T, int64_t K, const std::vector<FRows>& ms,
                          const std::vector<float*>& outs) {
  int64_t panels = 0;
  for (const auto& m : ms) panels += (m.n + kPanel - 1) / kPanel;
  Pool::parallel_for(panels, 1, [&](int64_t begin, int64_t end) {
    float* row = scratch<float, 4>(K + K * kPanel + T * kPanel);
    float *panel = row + K, *y = panel + K * kPanel;
    for (int64_t pi = begin; pi < end; ++pi) {
      size_t i;
      int64_t n0;
      const FRows& m = panel_of(ms, pi, &i, &n0);
      const int64_t cols = std::min(kPanel, m.n - n0);
      for (int64_t c = 0; c < kPanel; ++c) {  // transposed: (K, kPanel), zero past cols
        if (c < cols) {
          frow_to_f32(m, n0 + c, row);
        } else {
          std::fill(row, row + K, 0.f);
        }
        for (int64_t k = 0; k < K; ++k) panel[k * kPanel + c] = row[k];
      }
      if (cols == kPanel) {
        panel_tiles(x, T, K, panel, outs[i] + n0, m.n);
      } else {
        panel_tiles(x, T, K, panel, y, kPanel);
        for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, &y[t * kPanel], cols * sizeof(float));
      }
    }
  });
}

// y_i (T, N_i) = x (T, K) @ W_i^T for float matrices: the few-row kernel, or the panels when `many`.
inline void fmatmul(const float* x, int64_t T, int64_t K, const std::vector<FRows>& ms,
                    const std::vector<float*>& outs, bool many, int64_t ahead) {
  if (many) {
    fpanel_matmul(x, T, K, ms, outs);
  } else {
    fgemv(x, T, K, ms, outs, ahead);
  }
}

}  // namespace corelm
