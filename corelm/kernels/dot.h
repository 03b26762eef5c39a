// Integer dot products of quantized weight rows with quantized activation rows (included once, by
// corelm_kernels.cpp). The layouts are described in corelm_kernels.cpp's file comment.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace corelm {

constexpr int64_t QK = 32;  // values per block, weights and activations alike

// Q4, Q8: corelm's int4/int8 layouts (bf16 scales); the others: GGUF's own blocks (kquants.h)
enum class Kind { Q4, Q8, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS };

// Ask the memory system for bytes [p, p + bytes), a 64-byte line at a time, ahead of their use (decode
// steps stream each weight byte once). A hint: an address past the end of a buffer does not fault.
// Forced inline: the record sizes are constants at every call, so each becomes a few PREFETCHT0s (left to
// the compiler, the kernels inlined into qmatmul_packed's loop lost every one: no speed-up at all).
__attribute__((always_inline)) inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__AVX2__)
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
#else
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3);
#endif
}

// How far ahead of the record, float row or cache row being read the decode kernels prefetch, in bytes
// (repack.h, fgemv.h, attention.h). Measured on the 2-core Intel Xeon (family 6 model 207, AVX-512 VNNI),
// SmolLM2 decode at 1 thread: Q4_1 71 -> 108 tok/s and Q4_K_M 62 -> 95 at 4096 bytes (2048-8192 within
// the noise of each other), float weights fp32 +5-16% and bf16 +23-34% over two runs (the model
// dequantized to them); not yet measured on AMD, where it stays off. CORELM_PREFETCH overrides it (read
// at every call, as CORELM_GEMM_ROWS).
inline int64_t cpu_default_prefetch() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int64_t d = [] {
    unsigned a = 0, b = 0, c = 0, e = 0;
    __cpuid(0, a, b, c, e);
    char vendor[13];
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &e, 4);
    std::memcpy(vendor + 8, &c, 4);
    vendor[12] = 0;
    return std::strcmp(vendor, "GenuineIntel") == 0 ? int64_t(4096) : int64_t(0);
  }();
  return d;
#else
  return 0;
#endif
}

inline int64_t prefetch_ahead() {
  const char* v = std::getenv("CORELM_PREFETCH");
  if (v == nullptr || *v == 0) return cpu_default_prefetch();
  char* end = nullptr;
  const long long d = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == 0 && d >= 0 && d <= (1 << 20),
              "CORELM_PREFETCH is a byte count from 0 (off) to 1048576, not '", v, "'");
  return d;
}

#if defined(__AVX2__)
// r[0..7]: 8 rows of 8 floats -> r[j] = column j.
inline void transpose8(__m256* r) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // per 128-bit lane: r[i][0] r[i+1][0] r[i][1] r[i+1][1]
    a[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 2; ++g) {  // b[4g + j], 128-bit lane l: column 4l + j of rows 4g .. 4g + 3
    b[4 * g + 0] = _mm256_shuffle_ps(a[4 * g], a[4 * g + 2], 0x44);
    b[4 * g + 1] = _mm256_shuffle_ps(a[4 * g], a[4 * g + 2], 0xEE);
    b[4 * g + 2] = _mm256_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0x44);
    b[4 * g + 3] = _mm256_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(b[j], b[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(b[j], b[4 + j], 0x31);
  }
}
#endif

#if defined(__AVX512F__)
// r[0..15]: 16 rows of 16 words -> r[j] = column j (the standard unpack / 128-bit shuffle transpose).
inline void transpose16(__m512i* r) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4g + j], lane l: column 4l + j of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i lo01 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), hi01 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
    const __m512i lo23 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);       // lane 0 of each: column j
    r[4 + j] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);   // lane 1: column 4 + j
    r[8 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);   // lane 2: column 8 + j
    r[12 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);  // lane 3: column 12 + j
  }
}
#endif

inline float bf16(uint16_t h) {  // bf16 is the top half of an fp32
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Activation row -> blocks of 15-bit integers, stored as two int8 digits a = 128 * h + l (h in
// -127..127, l in 0..127): d = max|x| / 16256, a = round(x / d) (ties to even, as torch.round),
// s = d * sum(a). Two VPDPBUSD per block instead of llama.cpp's one int8 digit: measured on SmolLM2,
// 8-bit activations moved the argmax on 2.6% of held-out positions (mean KL 0.0037 nats); 15-bit
// ones leave only the weights' error. The Python reference corelm.kernels.reference_qlinear agrees.
constexpr float AMAX = 127.f * 128.f;

void quantize_row(const float* x, int64_t k, int8_t* qh, int8_t* ql, float* d, float* s) {
#if defined(__AVX2__)
  // the same arithmetic eight lanes at a time: max|x| is order-free, v = x * inv rounds to nearest even
  // (VCVTPS2DQ in the default rounding mode, as nearbyint), h = v >> 7 is floor(v / 128), l = v & 127
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 xv[4], m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      xv[i] = _mm256_loadu_ps(xb + 8 * i);
      m = _mm256_max_ps(m, _mm256_and_ps(xv[i], absmask));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(xv[i], xv[i], _CMP_UNORD_Q));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    // MAXPS drops a NaN, so a NaN activation is carried by the scale instead: d = NaN makes every
    // output of the row NaN (a failed row is then seen as one, not as finite garbage)
    const float db = _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(m4) / AMAX;
    const __m256 inv = _mm256_set1_ps(db > 0.f ? 1.f / db : 0.f);
    __m256i v[4], hv[4], lv[4], sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[i], inv));
      hv[i] = _mm256_srai_epi32(v[i], 7);
      lv[i] = _mm256_and_si256(v[i], _mm256_set1_epi32(127));
      sum = _mm256_add_epi32(sum, v[i]);
    }
    // int32 -> int8 keeping the order: packs interleave 128-bit lanes, the permute puts them back
    auto bytes = [&](const __m256i* w) {
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(w[0], w[1]), _mm256_packs_epi32(w[2], w[3]));
      return _mm256_permutevar8x32_epi32(p, order);
    };
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qh + b * QK), bytes(hv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ql + b * QK), bytes(lv));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    d[b] = db;
    s[b] = db * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
  return;
#endif
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    bool nan = false;
    for (int64_t j = 0; j < QK; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      nan = nan || std::isnan(xb[j]);
    }
    const float db = nan ? NAN : amax / AMAX;  // a NaN activation makes the row's outputs NaN
    const float inv = db > 0.f ? 1.f / db : 0.f;
    int sum = 0;
    for (int64_t j = 0; j < QK; ++j) {
      const int v = nan ? 0 : static_cast<int>(std::nearbyint(xb[j] * inv));
      const int h = v >= 0 ? v / 128 : -((-v + 127) / 128);  // floor(v / 128)
      qh[b * QK + j] = static_cast<int8_t>(h);
      ql[b * QK + j] = static_cast<int8_t>(v - 128 * h);
      sum += v;
    }
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
  }
}

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// sum over 4-byte groups of u8 * s8 into 8 int32 lanes
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 32 unsigned weights (u8) times one activation block: 128 * (w . h) + (w . l), 8 int32 lanes
inline __m256 block_u(__m256i w, const int8_t* qh, const int8_t* ql) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)  // VPDPBUSD adds the low digit's dot to the shifted high one
  const __m256i hi = _mm256_slli_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, load32(qh)), 7);
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(hi, w, load32(ql)));
#else
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(w, load32(qh)), 7), dot_u8s8(w, load32(ql))));
#endif
}

// 32 signed weights (s8): h takes w's sign (|w| . sign(h, w)); l is unsigned and multiplies w directly
inline __m256 block_s(__m256i w, const int8_t* qh, const int8_t* ql) {
  const __m256i hi = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(load32(qh), w));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_slli_epi32(hi, 7), load32(ql), w));
#else
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(hi, 7), dot_u8s8(load32(ql), w)));
#endif
}

inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> 32 values: low nibbles, then high
  const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r, 4), low), _mm_and_si128(r, low));
}
#endif

struct ActRow {  // one quantized activation row
  const int8_t *qh, *ql;
  const float *d, *s;
};

// One output row: ``nb`` blocks of 32 weights; block b takes scale (and zero) entry b / bpg.
struct Row {
  const uint8_t* q;    // int4: 16 bytes per block; int8: 32 bytes per block
  const uint16_t* s;   // bf16: int4 (scale, zero) pairs, int8 scales
  int64_t bpg;         // blocks per scale group (G / 32; per channel: K / 32)
};

// Dot products of one weight row with NT activation rows at once: the row's nibbles and scales are
// unpacked once and used NT times. Every activation row goes through the same operations in the
// same order whatever NT is, so a row's result does not depend on how many rows came with it.
template <int NT>
void dot_q4(const Row& w, const ActRow* a, int64_t nb, float* out) {
  float tail[NT] = {};
#if defined(__AVX2__)
  __m256 acc[NT], accz[NT], accs[NT];
  for (int t = 0; t < NT; ++t) acc[t] = accz[t] = accs[t] = _mm256_setzero_ps();
  int64_t b = 0;
  if (w.bpg == 1) {  // a (scale, zero) per block: eight blocks' scales at a time, in vectors
    for (; b + 8 <= nb; b += 8) {
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.s + 2 * b));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));  // bf16 -> fp32: the top half
      const __m256 zero =
          _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
      alignas(32) float sd[NT][8];
      for (int t = 0; t < NT; ++t) {  // m * s_a = zero * s_a - 8 * scale * s_a: two sums
        const __m256 sa = _mm256_loadu_ps(a[t].s + b);
        accz[t] = _mm256_fmadd_ps(zero, sa, accz[t]);
        accs[t] = _mm256_fmadd_ps(scale, sa, accs[t]);
        _mm256_store_ps(sd[t], _mm256_mul_ps(scale, _mm256_loadu_ps(a[t].d + b)));
      }
      for (int i = 0; i < 8; ++i) {
        const int64_t j = b + i;
        const __m256i wq = nibbles(w.q + j * QK / 2);
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(block_u(wq, a[t].qh + j * QK, a[t].ql + j * QK), _mm256_broadcast_ss(&sd[t][i]),
                                   acc[t]);
      }
    }
  }
  for (; b < nb; ++b) {
    const uint16_t* sz = w.s + 2 * (b / w.bpg);
    const float scale = bf16(sz[0]), m = bf16(sz[1]) - 8.f * scale;  // w = q * scale + m
    const __m256i wq = nibbles(w.q + b * QK / 2);
    for (int t = 0; t < NT; ++t) {
      acc[t] = _mm256_fmadd_ps(block_u(wq, a[t].qh + b * QK, a[t].ql + b * QK), _mm256_set1_ps(scale * a[t].d[b]),
                               acc[t]);
      tail[t] += m * a[t].s[b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) + (hsum(accz[t]) - 8.f * hsum(accs[t])) + tail[t];
#else
  float acc[NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint16_t* sz = w.s + 2 * (b / w.bpg);
    const float scale = bf16(sz[0]), m = bf16(sz[1]) - 8.f * scale;
    const uint8_t* qs = w.q + b * QK / 2;
    for (int t = 0; t < NT; ++t) {
      const int8_t *h = a[t].qh + b * QK, *l = a[t].ql + b * QK;
      int sumi = 0;
      for (int64_t j = 0; j < QK / 2; ++j) {
        const int k = j + QK / 2;
        sumi += (qs[j] & 0x0F) * (128 * h[j] + l[j]) + (qs[j] >> 4) * (128 * h[k] + l[k]);
      }
      acc[t] += scale * a[t].d[b] * static_cast<float>(sumi);
      tail[t] += m * a[t].s[b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t] + tail[t];
#endif
}

template <int NT>
void dot_q8(const Row& w, const ActRow* a, int64_t nb, float* out) {
  const int8_t* q = reinterpret_cast<const int8_t*>(w.q);
#if defined(__AVX2__)
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  if (w.bpg == 1 || w.bpg == nb) {  // a scale per block (Q8_0) or one per row: eight scales at a time
    for (; b + 8 <= nb; b += 8) {
      const __m256 scale =
          w.bpg == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                           _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.s + b))), 16))
                     : _mm256_set1_ps(bf16(w.s[0]));
      alignas(32) float sd[NT][8];
      for (int t = 0; t < NT; ++t) _mm256_store_ps(sd[t], _mm256_mul_ps(scale, _mm256_loadu_ps(a[t].d + b)));
      for (int i = 0; i < 8; ++i) {
        const int64_t j = b + i;
        const __m256i wq = load32(q + j * QK);
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + j * QK, a[t].ql + j * QK), _mm256_broadcast_ss(&sd[t][i]),
                                   acc[t]);
      }
    }
  }
  for (; b < nb; ++b) {
    const float scale = bf16(w.s[b / w.bpg]);
    const __m256i wq = load32(q + b * QK);
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + b * QK, a[t].ql + b * QK), _mm256_set1_ps(scale * a[t].d[b]),
                               acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
#else
  float acc[NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const float scale = bf16(w.s[b / w.bpg]);
    const int8_t* qb = q + b * QK;
    for (int t = 0; t < NT; ++t) {
      const int8_t *h = a[t].qh + b * QK, *l = a[t].ql + b * QK;
      int sumi = 0;
      for (int64_t j = 0; j < QK; ++j) sumi += static_cast<int>(qb[j]) * (128 * h[j] + l[j]);
      acc[t] += scale * a[t].d[b] * static_cast<float>(sumi);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
#endif
}

template <int NT>
void dot_blocks(Kind kind, const Row& w, const ActRow* a, int64_t nb, float* out);  // GGUF blocks: kquants.h

// One weight row against activation rows t0..t0+NT-1.
template <int NT>
void dot_rows(Kind kind, const Row& w, const ActRow* a, int64_t nb, float* out) {
  if (kind == Kind::Q4) {
    dot_q4<NT>(w, a, nb, out);
  } else if (kind == Kind::Q8) {
    dot_q8<NT>(w, a, nb, out);
  } else {
    dot_blocks<NT>(kind, w, a, nb, out);
  }
}

}  // namespace corelm
