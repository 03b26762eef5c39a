// The panel GEMM of a many-token matmul (a prompt's prefill, perplexity windows; included once, by
// qlinear.h): the weights are dequantized once, 32 output rows at a time, into a panel transposed so
// that one k's 32 weights are one or two vectors, and register tiles multiply every token by it. The
// panels are split across corelm's pool, like the integer kernels: ATen's OpenMP GEMM stalls at every
// call when a neighbour holds a core (measured on the 2-core Zen 4 at load 12: 6-8 tok/s for a
// 64-token SmolLM2 prefill, against 46 on the integer kernels).
//
// Four arithmetics, chosen per call (gemm_mode): int16 in the AVX-512 VNNI builds (avx512vnni and
// avx512bf16), fp32 in the others; CORELM_GEMM overrides it (bf16 needs the avx512bf16 build, made for
// CPUs that declare avx512_bf16, see corelm/kernels/__init__.py):
//   fp32  panels of fp32 weights, fp32 tokens, FMA tiles (6 tokens x 32 outputs on AVX-512): equals
//         x @ W^T to fp32 rounding. Every build.
//   bf16  (builds with AVX512_BF16 only) weights and tokens rounded to bf16 (8 significant bits,
//         relative error <= 2^-8 each), multiplied by VDPBF16PS, which takes pairs of k and sums the
//         exact products into fp32 accumulators: twice the multiply-adds of an fp32 FMA per instruction.
//         Each product x*w then carries a relative error <= 2^-7, so |y - x @ W^T| <= 2^-7 |x| @ |W|^T
//         (plus fp32 summation). llama.cpp's int8 GEMMs round tokens to 8-bit integers per block of 32
//         instead, a far coarser grid for a block's small values.
//   int16 (AVX-512 VNNI builds) the integer kernels' arithmetic (15-bit tokens per block of 32, the
//         format's own integer weights, block scales in fp32) with VPDPWSSD: as many multiply-adds per
//         instruction as VDPBF16PS, less the per-block scaling (0.7-0.9x bf16's speed on Zen 4), and
//         the integer kernels' accuracy. See the int16 section below.
//   aten  bf16 weights dequantized for the whole matrix and handed to at::mm (oneDNN: AMX tiles where
//         the CPU has them, avx512_core_bf16 otherwise), output rounded to bf16 as at::mm returns it.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dot.h"
#include "kquants.h"
#include "pool.h"

namespace corelm {

constexpr int64_t kPanel = 32;  // output rows per panel

enum class Gemm { F32, BF16, I16, I8, AMX, AMXEmulated, ATen };

inline bool amx_available();  // amx.h's amx_ready() in the AVX-512 VNNI builds, false in the others

#if defined(__AVX512BF16__)
constexpr bool kHasBF16 = true;
#else
constexpr bool kHasBF16 = false;
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHasI16 = true;
#else
constexpr bool kHasI16 = false;
#endif


inline Gemm parse_gemm(const std::string& name) {
  if (name == "fp32") return Gemm::F32;
  if (name == "bf16") {
    TORCH_CHECK(kHasBF16, "the bf16 panel GEMM needs the avx512bf16 build of the kernels");
    return Gemm::BF16;
  }
  if (name == "int16") {
    TORCH_CHECK(kHasI16, "the int16 panel GEMM needs an AVX-512 VNNI build of the kernels");
    return Gemm::I16;
  }
  if (name == "amx") {
    TORCH_CHECK(kHasI16 && amx_available(),
                "the amx panel GEMM needs a CPU that declares AMX-INT8, an OS that grants its tiles, tiles that pass "
                "corelm's check (python -m corelm.kernels --amx-check) and an AVX-512 VNNI build of the kernels");
    return Gemm::AMX;
  }
  if (name == "amx-emulated") {
    TORCH_CHECK(kHasI16, "the amx-emulated panel GEMM needs an AVX-512 VNNI build of the kernels");
    return Gemm::AMXEmulated;
  }
  if (name == "int8") {
    TORCH_CHECK(kHasI16, "the int8 panel GEMM needs an AVX-512 VNNI build of the kernels");
    return Gemm::I8;
  }
  TORCH_CHECK(name == "aten", "the panel GEMM is fp32, bf16, int16, int8, amx, amx-emulated or aten, not '", name, "'");
  return Gemm::ATen;
}

// CORELM_GEMM (read at every call: benchmarks/prefill.py alternates the arithmetics in one process).
inline Gemm gemm_mode() {
  const char* v = std::getenv("CORELM_GEMM");
  // int16 by default wherever VNNI exists (the avx512bf16 build included): a prompt's prefill then
  // computes what the integer decode kernels compute, so a token's logits do not depend on whether it
  // came in a prompt or one at a time; bf16 (~1.1x faster, top-1 98.8-99.2%) is opt-in.
  if (v == nullptr || *v == 0) return kHasI16 ? (amx_available() ? Gemm::AMX : Gemm::I16) : Gemm::F32;
  return parse_gemm(v);
}

// ---------------------------------------------------------------------------------------------------
// Dequantization of one weight row to fp32, as ggml's dequantize_row_* (kquants.h's scalar
// dequantize_blocks is the reference; these are its AVX-512 forms for the formats the panels meet most).
// ---------------------------------------------------------------------------------------------------

// Weight row r of a corelm int4/int8 row or a GGUF block row, scalar: q * scale (+ m for int4).
inline void dequantize_row_scalar(Kind kind, const Row& w, int64_t k, float* out) {
  if (kind != Kind::Q4 && kind != Kind::Q8) return dequantize_blocks(kind, w.q, k, out);
  for (int64_t b = 0; b < k / QK; ++b) {
    float* o = out + b * QK;
    if (kind == Kind::Q4) {
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

#if defined(__AVX2__)
// The decoders hand each 16 values to a sink as integers q with w = q * isc * d + m (isc: Q6_K's int8
// sub-block scale, 1 elsewhere), at offset off of the row. d and m are the same for a block of 32. The
// 16 integers travel as a V16: one AVX-512 register, or two AVX2 halves (the Zen 3 class), so each
// format's decoder is written once for both.
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct V16 {
  __m512i v;
  static V16 u8(const uint8_t* p) { return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static V16 i8(const uint8_t* p) { return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static V16 set1(int x) { return {_mm512_set1_epi32(x)}; }
  V16 operator&(V16 o) const { return {_mm512_and_si512(v, o.v)}; }
  V16 operator|(V16 o) const { return {_mm512_or_si512(v, o.v)}; }
  V16 operator-(V16 o) const { return {_mm512_sub_epi32(v, o.v)}; }
  V16 shr(int n) const { return {_mm512_srl_epi32(v, _mm_cvtsi32_si128(n))}; }
  V16 shl(int n) const { return {_mm512_sll_epi32(v, _mm_cvtsi32_si128(n))}; }
  V16 or16(uint32_t bits) const {  // + 16 in lane j where bit j of bits is set (v < 16 there)
    return {_mm512_mask_or_epi32(v, static_cast<__mmask16>(bits), v, _mm512_set1_epi32(16))};
  }
  V16 or16_bit(V16 h, int i) const {  // + 16 in the lanes where h has bit i
    return {_mm512_mask_or_epi32(v, _mm512_test_epi32_mask(h.v, _mm512_set1_epi32(1 << i)), v, _mm512_set1_epi32(16))};
  }
  void store(float* o, float scale, float m) const {
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(scale), _mm512_set1_ps(m)));
  }
};
#else
struct V16 {
  __m256i lo, hi;  // lanes 0-7, 8-15
  static V16 u8(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};
  }
  static V16 i8(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))};
  }
  static V16 set1(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
  V16 operator&(V16 o) const { return {_mm256_and_si256(lo, o.lo), _mm256_and_si256(hi, o.hi)}; }
  V16 operator|(V16 o) const { return {_mm256_or_si256(lo, o.lo), _mm256_or_si256(hi, o.hi)}; }
  V16 operator-(V16 o) const { return {_mm256_sub_epi32(lo, o.lo), _mm256_sub_epi32(hi, o.hi)}; }
  V16 shr(int n) const { return {_mm256_srl_epi32(lo, _mm_cvtsi32_si128(n)), _mm256_srl_epi32(hi, _mm_cvtsi32_si128(n))}; }
  V16 shl(int n) const { return {_mm256_sll_epi32(lo, _mm_cvtsi32_si128(n)), _mm256_sll_epi32(hi, _mm_cvtsi32_si128(n))}; }
  V16 or16(uint32_t bits) const {  // bit j of bits, moved to bit 4 of lane j
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), b = _mm256_set1_epi32(static_cast<int>(bits));
    const __m256i l = _mm256_srlv_epi32(b, lanes), h = _mm256_srlv_epi32(b, _mm256_add_epi32(lanes, _mm256_set1_epi32(8)));
    return *this | V16{_mm256_slli_epi32(_mm256_and_si256(l, _mm256_set1_epi32(1)), 4),
                       _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(1)), 4)};
  }
  V16 or16_bit(V16 h, int i) const { return *this | (h.shr(i) & set1(1)).shl(4); }
  void store(float* o, float scale, float m) const {
    const __m256 s = _mm256_set1_ps(scale), a = _mm256_set1_ps(m);
    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), s, a));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), s, a));
  }
};
#endif

struct FloatSink {  // fp32 weights, as dequantize_blocks computes them: q * (isc * d) + m
  float* o;
  void operator()(int64_t off, V16 q, int isc, float d, float m) const { q.store(o + off, d * static_cast<float>(isc), m); }
};

// Q4_K (HIGH false) and Q5_K super-blocks: sub-block i is nibble i % 2 of qs[32 (i / 2) + j] (+ 16 * bit i of qh[j]).
template <bool HIGH, class Sink>
inline void decode_q45k(const uint8_t* q, int64_t k, const Sink& put) {
  const V16 low = V16::set1(0xF);
  for (int64_t sb = 0; sb < k / QK_K; ++sb) {
    const uint8_t* blk = q + sb * (HIGH ? 176 : 144);
    const float d = fp16(u16(blk)), dmin = fp16(u16(blk + 2));
    uint8_t sc[8], m[8];
    scale_min_k4(blk + 4, sc, m);
    const uint8_t* qs = blk + 16 + (HIGH ? 32 : 0);
    for (int i = 0; i < 8; ++i) {
      const float dsc = d * static_cast<float>(sc[i]), dm = dmin * static_cast<float>(m[i]);
      for (int h = 0; h < 2; ++h) {
        V16 v = V16::u8(qs + 32 * (i / 2) + 16 * h).shr(4 * (i % 2)) & low;
        if (HIGH) v = v.or16_bit(V16::u8(blk + 16 + 16 * h), i);
        put(sb * QK_K + i * QK + 16 * h, v, 1, dsc, -dm);
      }
    }
  }
}

template <class Sink>
inline void decode_q6k(const uint8_t* q, int64_t k, const Sink& put) {
  const V16 low = V16::set1(0xF), three = V16::set1(3), off = V16::set1(32);
  for (int64_t sb = 0; sb < k / QK_K; ++sb) {
    const uint8_t* ql = q + sb * 210;
    const uint8_t* qh = ql + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(ql + 192);
    const float d = fp16(u16(ql + 208));
    for (int i = 0; i < 8; ++i) {
      const int c = i / 4, s = i % 4;
      for (int h = 0; h < 2; ++h) {  // values 16h..16h+15 of sub-block i, scale sc[2i + h]
        const V16 lo = V16::u8(ql + 64 * c + 32 * (s % 2) + 16 * h).shr(4 * (s / 2)) & low;
        const V16 hi = V16::u8(qh + 32 * c + 16 * h).shr(2 * s) & three;
        put(sb * QK_K + i * QK + 16 * h, (lo | hi.shl(4)) - off, sc[2 * i + h], d, 0.f);
      }
    }
  }
}

// Q5_0 (MIN false: w = d * (q - 16)) and Q5_1 (w = d*q + m): bit j of the 32-bit qh is bit 4 of value j.
template <bool MIN, class Sink>
inline void decode_q5(const uint8_t* q, int64_t k, const Sink& put) {
  const V16 low = V16::set1(0xF), off = V16::set1(MIN ? 0 : 16);  // Q5_0: q - 16
  for (int64_t b = 0; b < k / QK; ++b) {
    const uint8_t* blk = q + b * (MIN ? 24 : 22);
    const float d = fp16(u16(blk)), m = MIN ? fp16(u16(blk + 2)) : 0.f;
    uint32_t qh;
    std::memcpy(&qh, blk + (MIN ? 4 : 2), 4);
    const V16 raw = V16::u8(blk + (MIN ? 8 : 6));
    put(b * QK, (raw & low).or16(qh & 0xFFFF) - off, 1, d, m);
    put(b * QK + 16, raw.shr(4).or16(qh >> 16) - off, 1, d, m);
  }
}

// 32 IQ4 codes (Q4_0's nibble layout in qs[16]) looked up in kIQ4NL, a byte shuffle per 16: w = d * level.
template <class Sink>
inline void put_iq4(const uint8_t* qs, int64_t off, float d, const Sink& put) {
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(kIQ4NL)), low = _mm_set1_epi8(0xF);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  alignas(16) uint8_t v[32];  // the int8 levels of values 0..15, 16..31
  _mm_store_si128(reinterpret_cast<__m128i*>(v), _mm_shuffle_epi8(table, _mm_and_si128(raw, low)));
  _mm_store_si128(reinterpret_cast<__m128i*>(v + 16), _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), low)));
  put(off, V16::i8(v), 1, d, 0.f);
  put(off + 16, V16::i8(v + 16), 1, d, 0.f);
}

// A weight row through its format's decoder; false for the formats without one (Q8, corelm's int8 per channel).
template <class Sink>
inline bool decode_row(Kind kind, const Row& w, int64_t k, const Sink& put) {
  const V16 low = V16::set1(0xF);
  switch (kind) {
    case Kind::Q4_K: decode_q45k<false>(w.q, k, put); return true;
    case Kind::Q5_K: decode_q45k<true>(w.q, k, put); return true;
    case Kind::Q6_K: decode_q6k(w.q, k, put); return true;
    case Kind::IQ4_NL:
      for (int64_t b = 0; b < k / QK; ++b) put_iq4(w.q + b * 18 + 2, b * QK, fp16(u16(w.q + b * 18)), put);
      return true;
    case Kind::IQ4_XS:  // sub-block i: scale d * (ls_i - 32)
      for (int64_t sb = 0; sb < k / QK_K; ++sb) {
        const uint8_t* blk = w.q + sb * 136;
        for (int i = 0; i < 8; ++i)
          put_iq4(blk + 8 + 16 * i, sb * QK_K + i * QK, fp16(u16(blk)) * static_cast<float>(iq4xs_scale(blk, i)), put);
      }
      return true;
    case Kind::Q4_0:
    case Kind::Q4_1:
      for (int64_t b = 0; b < k / QK; ++b) {  // Q4_0: w = d * (q - 8); Q4_1: w = d*q + m
        const bool min = kind == Kind::Q4_1;
        const uint8_t* blk = w.q + b * (min ? 20 : 18);
        const float d = fp16(u16(blk)), m = min ? fp16(u16(blk + 2)) : 0.f;
        const V16 raw = V16::u8(blk + (min ? 4 : 2)), off = V16::set1(min ? 0 : 8);
        put(b * QK, (raw & low) - off, 1, d, m);
        put(b * QK + 16, raw.shr(4) - off, 1, d, m);
      }
      return true;
    case Kind::Q5_0: decode_q5<false>(w.q, k, put); return true;
    case Kind::Q5_1: decode_q5<true>(w.q, k, put); return true;
    case Kind::Q8_0:
      for (int64_t b = 0; b < k / QK; ++b) {
        const uint8_t* blk = w.q + b * 34;
        const float d = fp16(u16(blk));
        for (int h = 0; h < 2; ++h) put(b * QK + 16 * h, V16::i8(blk + 2 + 16 * h), 1, d, 0.f);
      }
      return true;
    case Kind::Q4:
      for (int64_t b = 0; b < k / QK; ++b) {
        const uint16_t* sz = w.s + 2 * (b / w.bpg);
        const float scale = bf16(sz[0]), shift = bf16(sz[1]) - 8.f * scale;
        const V16 raw = V16::u8(w.q + b * QK / 2);
        put(b * QK, raw & low, 1, scale, shift);
        put(b * QK + 16, raw.shr(4), 1, scale, shift);
      }
      return true;
    case Kind::Q8:
      for (int64_t b = 0; b < k / QK; ++b) {
        const float scale = bf16(w.s[b / w.bpg]);
        for (int h = 0; h < 2; ++h) put(b * QK + 16 * h, V16::i8(w.q + b * QK + 16 * h), 1, scale, 0.f);
      }
      return true;
    default:
      return false;
  }
}

inline void dequantize_row_fast(Kind kind, const Row& w, int64_t k, float* out) {
  if (!decode_row(kind, w, k, FloatSink{out})) dequantize_row_scalar(kind, w, k, out);
}
#else
inline void dequantize_row_fast(Kind kind, const Row& w, int64_t k, float* out) { dequantize_row_scalar(kind, w, k, out); }
#endif

// ---------------------------------------------------------------------------------------------------
// fp32 panels: p (K, kPanel) fp32
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int kTileRows = 6;  // 12 accumulators, 12 FMAs per two loads
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
inline void panel_tiles(const float* x, int64_t T, int64_t K, const float* p, float* y, int64_t ldy) {
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

// Rows 0 .. cols of m (panel_rows) as a transposed fp32 panel (K, kPanel), zero past cols; stage holds 8 rows
// (8, K): eight dequantized rows at a time are moved in 8 x 8 transposes (one row's values scattered
// 32 floats apart cost a third of a 128-token prefill on the AVX2 build, Zen 4 profile).
template <class Matrix>
void fill_panel_f32(const Matrix& m, int64_t cols, float* stage, float* panel) {
  const int64_t K = m.k;
  for (int64_t c0 = 0; c0 < kPanel; c0 += 8) {
    for (int64_t c = 0; c < 8; ++c) {
      float* s = stage + c * K;
      if (c0 + c < cols) {
        dequantize_row_fast(m.kind, m.row(c0 + c), K, s);
      } else {
        std::fill(s, s + K, 0.f);
      }
    }
#if defined(__AVX2__)
    for (int64_t k = 0; k < K; k += 8) {  // K is a multiple of 32
      __m256 r[8];
      for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(stage + c * K + k);
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(panel + (k + j) * kPanel + c0, r[j]);
    }
#else
    for (int64_t c = 0; c < 8; ++c)
      for (int64_t k = 0; k < K; ++k) panel[k * kPanel + c0 + c] = stage[c * K + k];
#endif
  }
}

// ---------------------------------------------------------------------------------------------------
// bf16 panels: p (K/2, kPanel) 32-bit words, each the bf16 pair (w[c][2i], w[c][2i+1]) that VDPBF16PS
// multiplies with a token's pair (x[2i], x[2i+1]) broadcast to every lane.
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512BF16__)
constexpr int kTileRowsBF16 = 8;  // 16 accumulators: 16 VDPBF16PS per 2 loads and 8 broadcasts

// 32 fp32 -> 32 bf16 (round to nearest even), in order: 16 pairs.
inline __m512i bf16x32(const float* v) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(v)));
}

// FloatSink's fp32 weights rounded to bf16 (nearest even), as bf16x32 rounds a dequantized row.
struct BF16Sink {
  uint16_t* o;
  void operator()(int64_t off, V16 q, int isc, float d, float m) const {
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q.v), _mm512_set1_ps(d * static_cast<float>(isc)), _mm512_set1_ps(m));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + off), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
};

// x (T, K) fp32 -> (T, K/2) bf16 pairs.
inline void to_bf16_pairs(const float* x, int64_t T, int64_t K, uint32_t* out) {
  Pool::parallel_for(T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * K; i < end * K; i += 32)
      _mm512_storeu_si512(out + i / 2, bf16x32(x + i));
  });
}

// Rows 0 .. cols of m (panel_rows) as a bf16 pair panel (K/2, kPanel), zero past cols: 16 rows at a time are
// dequantized and rounded into ``stage`` (16, K/2), then moved in 16 x 16 word transposes.
template <class Matrix>
void fill_panel_bf16(const Matrix& m, int64_t cols, float* row, uint32_t* stage, uint32_t* panel) {
  const int64_t K = m.k, KP = K / 2;
  for (int64_t c0 = 0; c0 < kPanel; c0 += 16) {
    for (int64_t c = 0; c < 16; ++c) {
      uint32_t* s = stage + c * KP;
      if (c0 + c < cols) {  // straight to bf16 where the format has an AVX-512 decoder
        if (!decode_row(m.kind, m.row(c0 + c), K, BF16Sink{reinterpret_cast<uint16_t*>(s)})) {
          dequantize_row_scalar(m.kind, m.row(c0 + c), K, row);
          for (int64_t k = 0; k < K; k += 32) _mm512_storeu_si512(s + k / 2, bf16x32(row + k));
        }
      } else {
        std::fill(s, s + KP, 0u);
      }
    }
    for (int64_t kp = 0; kp < KP; kp += 16) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(stage + c * KP + kp);
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (kp + j) * kPanel + c0, r[j]);
    }
  }
}

template <int NT>
void panel_tile_bf16(const uint32_t* x, int64_t KP, const uint32_t* p, float* y, int64_t ldy) {
  __m512 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < KP; ++k) {
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p + k * kPanel));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p + k * kPanel + 16));
    for (int t = 0; t < NT; ++t) {
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x[t * KP + k])));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], xb, w0);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], xb, w1);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_ps(y + t * ldy, acc[t][0]);
    _mm512_storeu_ps(y + t * ldy + 16, acc[t][1]);
  }
}

inline void panel_tiles_bf16(const uint32_t* x, int64_t T, int64_t KP, const uint32_t* p, float* y, int64_t ldy) {
  int64_t t0 = 0;
  for (; t0 + kTileRowsBF16 <= T; t0 += kTileRowsBF16)
    panel_tile_bf16<kTileRowsBF16>(x + t0 * KP, KP, p, y + t0 * ldy, ldy);
  const uint32_t* xt = x + t0 * KP;
  float* yt = y + t0 * ldy;
  switch (T - t0) {  // the last few tokens
    case 7: panel_tile_bf16<7>(xt, KP, p, yt, ldy); break;
    case 6: panel_tile_bf16<6>(xt, KP, p, yt, ldy); break;
    case 5: panel_tile_bf16<5>(xt, KP, p, yt, ldy); break;
    case 4: panel_tile_bf16<4>(xt, KP, p, yt, ldy); break;
    case 3: panel_tile_bf16<3>(xt, KP, p, yt, ldy); break;
    case 2: panel_tile_bf16<2>(xt, KP, p, yt, ldy); break;
    case 1: panel_tile_bf16<1>(xt, KP, p, yt, ldy); break;
    default: break;
  }
}
#endif

// ---------------------------------------------------------------------------------------------------
// The drivers
// ---------------------------------------------------------------------------------------------------

// A buffer of n elements that lives as long as the thread (the pool's workers are never joined): a
// prefill's ~200 GEMMs would otherwise map and fault in fresh pages for every panel.
template <class T, int Tag>
T* scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Panel pi of the concatenation of ms: its matrix and first row.
template <class Matrix>
const Matrix& panel_of(const std::vector<Matrix>& ms, int64_t pi, size_t* i, int64_t* n0) {
  *i = 0;
  while (pi >= (ms[*i].n + kPanel - 1) / kPanel) pi -= (ms[(*i)++].n + kPanel - 1) / kPanel;
  *n0 = pi * kPanel;
  return ms[*i];
}

// ---------------------------------------------------------------------------------------------------
// int16 panels (builds with AVX-512 VNNI): the integer kernels' arithmetic as a GEMM. Tokens are
// quantized as for them (per block of 32: d_a, 15-bit integers a, s_a = d_a * sum(a); dot.h), weights
// are their format's integers (|q| <= 4096: Q6_K's sub-block scale times q - 32) with an fp32 scale d_w
// and offset m_w per block, and VPDPWSSD sums 32 int16 products a block at a time, exactly in int32
// (|sum| <= 32 * 16256 * 4096 < 2^31):
//   y[t, c] = sum_b d_w[c, b] * d_a[t, b] * (q_w[c, b] . a[t, b]) + m_w[c, b] * s_a[t, b]
// p (K/2, kPanel) 32-bit words, each the int16 pair (q[c][2i], q[c][2i+1]); dw, mw (K/32, kPanel).
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int64_t kTileRowsInt = 6;  // tokens a register tile: 12 float + 12 int32 accumulators (panel_tiles_int)

// The decoders' integers as int16 weights q * isc (|q * isc| <= 4096) and the fp32 scale and offset of each block.
struct IntSink {
  int16_t* q;
  float *d, *m;
  void operator()(int64_t off, V16 w, int isc, float dd, float mm) const {
    __m512i v = w.v;
    if (isc != 1) v = _mm512_mullo_epi32(v, _mm512_set1_epi32(isc));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + off), _mm512_cvtepi32_epi16(v));
    d[off / QK] = dd;
    m[off / QK] = mm;
  }
};

// x (T, K) -> a (T, K) int16, d, s (T, K/32): quantize_row's arithmetic (the same integers), vectorized.
inline void quantize_rows_i16(const float* x, int64_t T, int64_t K, int16_t* a, float* d, float* s) {
  Pool::parallel_for(T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin * K / QK; b < end * K / QK; ++b) {
      const __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const bool nan = _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
      const float db = nan ? NAN : amax / AMAX;  // as quantize_row: a NaN token's outputs are NaN
      const __m512 inv = _mm512_set1_ps(db > 0.f ? 1.f / db : 0.f);
      const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), v1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + b * QK), _mm512_cvtepi32_epi16(v0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + b * QK + 16), _mm512_cvtepi32_epi16(v1));
      d[b] = db;
      s[b] = db * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1)));
    }
  });
}

// Rows 0 .. cols of m (panel_rows) as a panel of 32-bit words with its block scales, zero past cols: each row's
// integers, as sink(row) stores them (int16 pairs or byte quads), are staged 16 rows at a time in stage
// (16, KW16 words; past K's KW words zero up to the next 16, as the 16 x 16 word transposes take whole
// vectors) and moved to panel (KW, kPanel).
template <class Matrix, class Sink>
void fill_panel_words(const Matrix& m, int64_t cols, int64_t KW, const Sink& sink, void* row, float* rd, float* rm,
                      uint32_t* stage, uint32_t* panel, float* dw, float* mw) {
  const int64_t K = m.k, KW16 = (KW + 15) / 16 * 16, nb = K / QK;
  for (int64_t c0 = 0; c0 < kPanel; c0 += 16) {
    for (int64_t c = 0; c < 16; ++c) {
      uint32_t* st = stage + c * KW16;
      if (c0 + c < cols) {
        decode_row(m.kind, m.row(c0 + c), K, sink(row, rd, rm));
        std::memcpy(st, row, KW * sizeof(uint32_t));
        std::fill(st + KW, st + KW16, 0u);
      } else {
        std::fill(st, st + KW16, 0u);
        std::fill(rd, rd + nb, 0.f);
        std::fill(rm, rm + nb, 0.f);
      }
      for (int64_t b = 0; b < nb; ++b) {
        dw[b * kPanel + c0 + c] = rd[b];
        mw[b * kPanel + c0 + c] = rm[b];
      }
    }
    for (int64_t kw = 0; kw < KW; kw += 16) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(stage + c * KW16 + kw);
      transpose16(r);
      for (int j = 0; j < 16 && kw + j < KW; ++j) _mm512_storeu_si512(panel + (kw + j) * kPanel + c0, r[j]);
    }
  }
}

// y (NT, kPanel) = NT tokens times an integer panel p: int16 pairs by VPDPWSSD (BYTES false: a holds K/2
// words a row) or byte quads by VPDPBUSD (BYTES: K/4 words a row, the weights' offset off taken off as
// off * A per block); da, sa (and asum) hold K/32 values a row. MIN: some m_w != 0.
template <int NT, bool MIN, bool BYTES>
void panel_tile_int(const uint32_t* a, const float* da, const float* sa, const int32_t* asum, int off, int64_t nb,
                    const uint32_t* p, const float* dw, const float* mw, float* y, int64_t ldy) {
  constexpr int64_t kWords = BYTES ? QK / 4 : QK / 2;  // words of a block
  const int64_t KW = nb * kWords;
  __m512 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i sum[NT][2];
    for (int t = 0; t < NT; ++t) sum[t][0] = sum[t][1] = _mm512_set1_epi32(BYTES ? -off * asum[t * nb + b] : 0);
    for (int64_t k = b * kWords; k < (b + 1) * kWords; ++k) {
      const __m512i w0 = _mm512_loadu_si512(p + k * kPanel), w1 = _mm512_loadu_si512(p + k * kPanel + 16);
      for (int t = 0; t < NT; ++t) {
        const __m512i xb = _mm512_set1_epi32(static_cast<int>(a[t * KW + k]));
        if constexpr (BYTES) {
          sum[t][0] = _mm512_dpbusd_epi32(sum[t][0], w0, xb);
          sum[t][1] = _mm512_dpbusd_epi32(sum[t][1], w1, xb);
        } else {
          sum[t][0] = _mm512_dpwssd_epi32(sum[t][0], xb, w0);
          sum[t][1] = _mm512_dpwssd_epi32(sum[t][1], xb, w1);
        }
      }
    }
    const __m512 d0 = _mm512_loadu_ps(dw + b * kPanel), d1 = _mm512_loadu_ps(dw + b * kPanel + 16);
    const __m512 m0 = MIN ? _mm512_loadu_ps(mw + b * kPanel) : d0, m1 = MIN ? _mm512_loadu_ps(mw + b * kPanel + 16) : d1;
    for (int t = 0; t < NT; ++t) {
      const __m512 dt = _mm512_set1_ps(da[t * nb + b]), st = _mm512_set1_ps(MIN ? sa[t * nb + b] : 0.f);
      if (MIN) {
        acc[t][0] = _mm512_fmadd_ps(m0, st, acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(m1, st, acc[t][1]);
      }
      acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t][0]), _mm512_mul_ps(d0, dt), acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t][1]), _mm512_mul_ps(d1, dt), acc[t][1]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_ps(y + t * ldy, acc[t][0]);
    _mm512_storeu_ps(y + t * ldy + 16, acc[t][1]);
  }
}

// All T tokens, kTileRowsInt at a time.
template <bool MIN, bool BYTES>
void panel_tiles_int(const uint32_t* a, const float* da, const float* sa, const int32_t* asum, int off, int64_t T,
                     int64_t nb, const uint32_t* p, const float* dw, const float* mw, float* y, int64_t ldy) {
  const int64_t KW = nb * (BYTES ? QK / 4 : QK / 2);
  for (int64_t t0 = 0; t0 < T; t0 += kTileRowsInt) {
    const uint32_t* at = a + t0 * KW;
    const float *dt = da + t0 * nb, *st = sa + t0 * nb;
    const int32_t* At = BYTES ? asum + t0 * nb : nullptr;
    float* yt = y + t0 * ldy;
    switch (std::min<int64_t>(kTileRowsInt, T - t0)) {
      case 6: panel_tile_int<6, MIN, BYTES>(at, dt, st, At, off, nb, p, dw, mw, yt, ldy); break;
      case 5: panel_tile_int<5, MIN, BYTES>(at, dt, st, At, off, nb, p, dw, mw, yt, ldy); break;
      case 4: panel_tile_int<4, MIN, BYTES>(at, dt, st, At, off, nb, p, dw, mw, yt, ldy); break;
      case 3: panel_tile_int<3, MIN, BYTES>(at, dt, st, At, off, nb, p, dw, mw, yt, ldy); break;
      case 2: panel_tile_int<2, MIN, BYTES>(at, dt, st, At, off, nb, p, dw, mw, yt, ldy); break;
      default: panel_tile_int<1, MIN, BYTES>(at, dt, st, At, off, nb, p, dw, mw, yt, ldy); break;
    }
  }
}

// The tiles without the offset term when every m_w of the panel is 0 (Q8_0, Q6_K, Q5_0, int8 weights).
template <bool BYTES>
void panel_tiles_int(const uint32_t* a, const float* da, const float* sa, const int32_t* asum, int off, int64_t T,
                     int64_t nb, const uint32_t* p, const float* dw, const float* mw, float* y, int64_t ldy) {
  if (std::any_of(mw, mw + nb * kPanel, [](float v) { return v != 0.f; })) {
    panel_tiles_int<true, BYTES>(a, da, sa, asum, off, T, nb, p, dw, mw, y, ldy);
  } else {
    panel_tiles_int<false, BYTES>(a, da, sa, asum, off, T, nb, p, dw, mw, y, ldy);
  }
}

template <class Matrix>
void int16_matmul(const float* x, int64_t T, int64_t K, const std::vector<Matrix>& ms, const std::vector<float*>& outs,
                  int64_t panels) {
  const int64_t nb = K / QK;
  uint32_t* a = scratch<uint32_t, 0>(T * K / 2);  // the caller's: the workers use Tag 1-4 only
  float* da = scratch<float, 0>(2 * T * nb);
  float* sa = da + T * nb;
  quantize_rows_i16(x, T, K, reinterpret_cast<int16_t*>(a), da, sa);
  Pool::parallel_for(panels, 1, [&](int64_t begin, int64_t end) {
    int16_t* row = scratch<int16_t, 1>(K);
    float* rd = scratch<float, 1>(2 * nb + 2 * nb * kPanel + T * kPanel);
    float *rm = rd + nb, *dw = rm + nb, *mw = dw + nb * kPanel, *y = mw + nb * kPanel;
    uint32_t* stage = scratch<uint32_t, 1>(16 * K / 2 + K / 2 * kPanel);
    uint32_t* panel = stage + 16 * K / 2;
    for (int64_t pi = begin; pi < end; ++pi) {
      size_t i;
      int64_t n0;
      const Matrix& m = panel_of(ms, pi, &i, &n0);
      const int64_t cols = std::min(kPanel, m.n - n0);
      fill_panel_words(panel_rows(m, n0, cols), cols, K / 2,
                       [](void* r, float* d, float* mm) { return IntSink{static_cast<int16_t*>(r), d, mm}; }, row, rd, rm,
                       stage, panel, dw, mw);
      if (cols == kPanel) {  // straight into the output
        panel_tiles_int<false>(a, da, sa, nullptr, 0, T, nb, panel, dw, mw, outs[i] + n0, m.n);
      } else {
        panel_tiles_int<false>(a, da, sa, nullptr, 0, T, nb, panel, dw, mw, y, kPanel);
        for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, &y[t * kPanel], cols * sizeof(float));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// int8 panels (builds with AVX-512 VNNI): llama.cpp's arithmetic for a many-token matmul. Tokens are
// rounded to 8-bit integers per block of 32 (d_a = amax / 127, |a| <= 127, A = sum(a), s_a = d_a * A);
// weights are their format's integers stored as bytes u = q + o (o = 128 for the signed formats, 0 for
// Q4_K, Q5_K, Q4_1, Q5_1 and corelm's int4, whose integers are unsigned), and VPDPBUSD sums four u8 x s8
// products a lane: twice VPDPWSSD's multiply-adds an instruction. The offset comes off exactly, in int32
// (|u . a| <= 32 * 255 * 127): q . a = u . a - o * A, so
//   y[t, c] = sum_b d_w[c, b] * d_a[t, b] * (u_w[c, b] . a[t, b] - o A[t, b]) + m_w[c, b] * s_a[t, b]
// which is dequantize-then-matmul of the 8-bit tokens to fp32 rounding. Q6_K's integers (its int8
// sub-block scale times q - 32, up to 4096) do not fit a byte: its matrices keep the int16 panels.
// p (K/4, kPanel) 32-bit words, each the bytes u[c][4i .. 4i+3]: an AMX-INT8 B tile's layout.
// ---------------------------------------------------------------------------------------------------
inline bool int8_fits(Kind kind) { return kind != Kind::Q6_K; }

inline int int8_offset(Kind kind) {
  switch (kind) {
    case Kind::Q4_K: case Kind::Q5_K: case Kind::Q4_1: case Kind::Q5_1: case Kind::Q4: return 0;
    default: return 128;
  }
}

// The decoders' integers as bytes q + off (isc is 1 for every format int8_fits admits).
struct ByteSink {
  uint8_t* q;
  float *d, *m;
  int off;
  void operator()(int64_t o, V16 w, int /*isc*/, float dd, float mm) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + o), _mm512_cvtepi32_epi8(_mm512_add_epi32(w.v, _mm512_set1_epi32(off))));
    d[o / QK] = dd;
    m[o / QK] = mm;
  }
};

// x (T, K) -> a (T, K) int8, d, s, A (T, K/32): d = amax / 127, a = round(x * (1 / d)) (to nearest even).
inline void quantize_rows_i8(const float* x, int64_t T, int64_t K, int8_t* a, float* d, float* s, int32_t* asum) {
  Pool::parallel_for(T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin * K / QK; b < end * K / QK; ++b) {
      const __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const bool nan = _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
      const float db = nan ? NAN : amax / 127.f;  // a NaN token's outputs are NaN
      const __m512 inv = _mm512_set1_ps(db > 0.f ? 1.f / db : 0.f);
      const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), v1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + b * QK), _mm512_cvtepi32_epi8(v0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + b * QK + 16), _mm512_cvtepi32_epi8(v1));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
      d[b] = db;
      s[b] = db * static_cast<float>(sum);
      asum[b] = sum;
    }
  });
}

// The byte panels' driver (int8 and amx): every panel of ms on the pool, filled with the format's
// integers as bytes and handed to tiles(panel, dw, mw, off, min, out, ld), min: some m_w != 0; a partial
// panel's outputs go through a buffer.
template <class Matrix, class Tiles>
void byte_panels(int64_t T, int64_t K, const std::vector<Matrix>& ms, const std::vector<float*>& outs, int64_t panels,
                 const Tiles& tiles) {
  const int64_t nb = K / QK;
  Pool::parallel_for(panels, 1, [&](int64_t begin, int64_t end) {
    uint8_t* row = scratch<uint8_t, 1>(K);
    float* rd = scratch<float, 1>(2 * nb + 2 * nb * kPanel + T * kPanel);
    float *rm = rd + nb, *dw = rm + nb, *mw = dw + nb * kPanel, *y = mw + nb * kPanel;
    const int64_t KQ16 = (K / 4 + 15) / 16 * 16;
    uint32_t* stage = scratch<uint32_t, 1>(16 * KQ16 + K / 4 * kPanel);
    uint32_t* panel = stage + 16 * KQ16;
    for (int64_t pi = begin; pi < end; ++pi) {
      size_t i;
      int64_t n0;
      const Matrix& m = panel_of(ms, pi, &i, &n0);
      const int64_t cols = std::min(kPanel, m.n - n0);
      const int off = int8_offset(m.kind);
      fill_panel_words(panel_rows(m, n0, cols), cols, K / 4,
                       [off](void* r, float* d, float* mm) { return ByteSink{static_cast<uint8_t*>(r), d, mm, off}; },
                       row, rd, rm, stage, panel, dw, mw);
      const bool min = std::any_of(mw, mw + nb * kPanel, [](float v) { return v != 0.f; });
      float* out = cols == kPanel ? outs[i] + n0 : y;  // straight into the output when the panel is whole
      tiles(panel, dw, mw, off, min, out, cols == kPanel ? m.n : kPanel);
      if (cols != kPanel)
        for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, &y[t * kPanel], cols * sizeof(float));
    }
  });
}

template <class Matrix>
void int8_matmul(const float* x, int64_t T, int64_t K, const std::vector<Matrix>& ms, const std::vector<float*>& outs,
                 int64_t panels) {
  const int64_t nb = K / QK;
  uint32_t* a = scratch<uint32_t, 0>(T * K / 4);  // the caller's: the workers use Tag 1-4 only
  float* da = scratch<float, 0>(2 * T * nb);
  float* sa = da + T * nb;
  int32_t* asum = scratch<int32_t, 0>(T * nb);
  quantize_rows_i8(x, T, K, reinterpret_cast<int8_t*>(a), da, sa, asum);
  byte_panels(T, K, ms, outs, panels,
              [&](const uint32_t* p, const float* dw, const float* mw, int off, bool min, float* out, int64_t ld) {
                if (min) {
                  panel_tiles_int<true, true>(a, da, sa, asum, off, T, nb, p, dw, mw, out, ld);
                } else {
                  panel_tiles_int<false, true>(a, da, sa, asum, off, T, nb, p, dw, mw, out, ld);
                }
              });
}

}  // namespace corelm

#include "amx.h"

namespace corelm {
inline bool amx_available() { return amx_ready(); }
inline int64_t amx_probe() { return amx_check(); }
inline bool amx_turn_on() { return amx_enable(); }
#else
inline bool amx_available() { return false; }
inline int64_t amx_probe() { return 1; }  // builds without AVX-512 VNNI have no tile kernel
inline bool amx_turn_on() { return false; }
#endif

// Every matrix dequantized whole to bf16 and multiplied by at::mm (oneDNN). The dequantization is
// split across corelm's pool; the multiplication runs on ATen's threads.
template <class Matrix>
void aten_matmul(const float* x, int64_t T, int64_t K, const std::vector<Matrix>& ms, const std::vector<float*>& outs) {
  const at::Tensor xb = at::from_blob(const_cast<float*>(x), {T, K}, at::kFloat).to(at::kBFloat16);
  for (size_t i = 0; i < ms.size(); ++i) {
    const Matrix& m = ms[i];
    at::Tensor w = at::empty({m.n, K}, at::kBFloat16);
    auto* wp = reinterpret_cast<uint16_t*>(w.data_ptr());
    Pool::parallel_for((m.n + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      for (int64_t pi = begin; pi < end; ++pi) {
        const int64_t n0 = pi * kPanel, cols = std::min(kPanel, m.n - n0);
        const Matrix rows = panel_rows(m, n0, cols);
        for (int64_t r = 0; r < cols; ++r) {
          dequantize_row_fast(m.kind, rows.row(r), K, row.data());
          for (int64_t k = 0; k < K; ++k) wp[(n0 + r) * K + k] = c10::BFloat16(row[k]).x;  // round to nearest even
        }
      }
    });
    at::Tensor y = at::from_blob(outs[i], {T, m.n}, at::kFloat);
    y.copy_(at::mm(xb, w.t()));
  }
}

// y_i (T, N_i) = x (T, K) @ W_i^T for every matrix in ms, on dequantized panels split across the pool.
template <class Matrix>
void panel_matmul(const float* x, int64_t T, int64_t K, const std::vector<Matrix>& ms, const std::vector<float*>& outs) {
  const Gemm mode = gemm_mode();
  if (mode == Gemm::ATen) return aten_matmul(x, T, K, ms, outs);
  int64_t panels = 0;
  for (const auto& m : ms) panels += (m.n + kPanel - 1) / kPanel;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const bool bytes = std::all_of(ms.begin(), ms.end(), [](const Matrix& m) { return int8_fits(m.kind); });
  if (mode == Gemm::I8 && bytes) return int8_matmul(x, T, K, ms, outs, panels);
  if (mode == Gemm::AMX && bytes) return amx_matmul<HardwareTiles>(x, T, K, ms, outs, panels);
  if (mode == Gemm::AMXEmulated && bytes) return amx_matmul<EmulatedTiles>(x, T, K, ms, outs, panels);
  if (mode != Gemm::F32) return int16_matmul(x, T, K, ms, outs, panels);  // int16, and Q6_K under int8 or amx
#endif
#if defined(__AVX512BF16__)
  if (mode == Gemm::BF16) {
    uint32_t* xb = scratch<uint32_t, 0>(T * K / 2);
    to_bf16_pairs(x, T, K, xb);
    Pool::parallel_for(panels, 1, [&](int64_t begin, int64_t end) {
      float* row = scratch<float, 2>(K + T * kPanel);
      float* y = row + K;
      uint32_t* stage = scratch<uint32_t, 2>(16 * K / 2 + K / 2 * kPanel);
      uint32_t* panel = stage + 16 * K / 2;
      for (int64_t pi = begin; pi < end; ++pi) {
        size_t i;
        int64_t n0;
        const Matrix& m = panel_of(ms, pi, &i, &n0);
        const int64_t cols = std::min(kPanel, m.n - n0);
        fill_panel_bf16(panel_rows(m, n0, cols), cols, row, stage, panel);
        if (cols == kPanel) {  // straight into the output
          panel_tiles_bf16(xb, T, K / 2, panel, outs[i] + n0, m.n);
        } else {
          panel_tiles_bf16(xb, T, K / 2, panel, y, kPanel);
          for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, &y[t * kPanel], cols * sizeof(float));
        }
      }
    });
    return;
  }
#endif
  Pool::parallel_for(panels, 1, [&](int64_t begin, int64_t end) {
    float* stage = scratch<float, 3>(8 * K + K * kPanel + T * kPanel);
    float *panel = stage + 8 * K, *y = panel + K * kPanel;
    for (int64_t pi = begin; pi < end; ++pi) {
      size_t i;
      int64_t n0;
      const Matrix& m = panel_of(ms, pi, &i, &n0);
      const int64_t cols = std::min(kPanel, m.n - n0);
      fill_panel_f32(panel_rows(m, n0, cols), cols, stage, panel);
      if (cols == kPanel) {
        panel_tiles(x, T, K, panel, outs[i] + n0, m.n);
      } else {
        panel_tiles(x, T, K, panel, y, kPanel);
        for (int64_t t = 0; t < T; ++t) std::memcpy(outs[i] + t * m.n + n0, &y[t * kPanel], cols * sizeof(float));
      }
    }
  });
}

}  // namespace corelm
