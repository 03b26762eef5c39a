// Dot products of GGUF's own blocks -- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS -- with corelm's
// 15-bit activation blocks (included once, by qlinear.h). The weights stay in the bytes llama.cpp's
// quantizer wrote: no float copy, no re-rounding of their fp16 scales.
//
// Layouts (ggml-common.h; a K "super-block" is 256 values of one row, QK_K):
//   Q8_0  34 bytes / 32 values:  d fp16 | qs[32] int8                       w = d * q
//   Q4_0  18 bytes / 32 values:  d fp16 | qs[16]                           w = d * (q - 8)
//   Q4_1  20 bytes / 32 values:  d, m fp16 | qs[16]                        w = d * q + m
//   Q5_0  22 bytes / 32 values:  d fp16 | qh[4] | qs[16]                    w = d * (q - 16)
//   Q5_1  24 bytes / 32 values:  d, m fp16 | qh[4] | qs[16]                 w = d * q + m
//   IQ4_NL 18 bytes / 32 values: d fp16 | qs[16]                           w = d * kv[q]
// (Q4_x, IQ4_NL: value j is the low nibble of qs[j] for j < 16, the high nibble of qs[j - 16] after. Q5_x: the same
// nibbles with bit 4 = bit j of qh; llama.cpp's quantizer writes them for K-quant matrices whose rows are
// not whole 256-value super-blocks.)
//   Q4_K 144 bytes / 256 values: d, dmin fp16 | scales[12] | qs[128]        w = d*sc_i * q - dmin*m_i
//   Q5_K 176 bytes / 256 values: d, dmin fp16 | scales[12] | qh[32] | qs[128]   (q gains bit 4 from qh)
//   Q6_K 210 bytes / 256 values: ql[128] | qh[64] | scales[16] int8 | d fp16    w = d*sc_j * (q - 32)
//   IQ4_XS 136 bytes / 256 values: d fp16 | scales_h u16 | scales_l[4] | qs[128]   w = d*(ls_i - 32) * kv[q]
// Q4_K/Q5_K: eight sub-blocks of 32, each with a 6-bit scale sc_i and min m_i packed into scales[12]
// (get_scale_min_k4); sub-block i is the low (i even) or high (i odd) nibbles of qs[32*(i/2) ...].
// Q6_K: sixteen 16-value scales; sub-block i = 4c + s of 128-value chunk c is nibble s/2 of
// ql[64c + 32*(s%2) + l] with bits 4-5 from (qh[32c + l] >> 2s) & 3.
// IQ4_NL and IQ4_XS (llama.cpp's non-linear 4-bit types; its quantizer writes IQ4_NL for an IQ4_XS file's
// matrices whose rows are not whole super-blocks): q is a 4-bit code into the int8 table kv. IQ4_XS:
// sub-block i has the 6-bit scale ls_i = nibble i % 2 of
// scales_l[i/2] | bits 2i..2i+1 of scales_h << 4, and its 32 values are 4-bit codes into the int8 table kv
// (kvalues_iq4nl), laid out as Q4_0's: low nibbles of qs[16i ...] are values 0..15, high ones 16..31.
//
// A sub-block is 32 values, exactly one activation block (d_a, a, s_a = d_a * sum(a)), so
//   y = sum_i (d*sc_i) * d_a * (q_i . a) - (dmin*m_i) * s_a          (Q4_K, Q5_K)
//   y = sum_i d_a * d * (sc_lo * (q-32)_lo . a_lo + sc_hi * (q-32)_hi . a_hi)   (Q6_K: two halves)
//   y = sum_i (d*(ls_i - 32)) * d_a * (kv[q_i] . a)                               (IQ4_XS)
// with the integer dots exact, as in llama.cpp's ggml_vec_dot_q4_K_q8_K (whose activations are 8-bit).
// corelm.quant.kquant.reference_qlinear_blocks states the same arithmetic in PyTorch.
#pragma once

#include "dot.h"

namespace corelm {

constexpr int64_t QK_K = 256;

// GGML type ids (ggml.h enum ggml_type) of the block formats with a kernel here.
enum GGMLType : int64_t {
  GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14,
  GGML_IQ4_NL = 20, GGML_IQ4_XS = 23,
  // Not GGML types: corelm's own int4 and int8 matrices kept only repacked (qlinear.h as_matrix_packed),
  // numbered past ggml's range. A row of theirs, as unpack_blocks returns it, is the row's values followed
  // by its scales per block of 32: int4 nibbles (k/2 bytes, Q4_1's nibble order) then a bf16 (scale, zero)
  // pair per block; int8 values (k bytes) then a bf16 scale per block.
  CORELM_INT4 = 1004, CORELM_INT8 = 1008
};

// IQ4_NL's and IQ4_XS's 16 levels (ggml-common.h kvalues_iq4nl), indexed by a 4-bit code.
alignas(16) constexpr int8_t kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

inline float fp16(uint16_t h) {  // IEEE half -> float, exact (subnormals included)
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

inline uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__AVX2__)
// Eight fp16 fields ``stride`` bytes apart (one per block) as fp32 lanes.
inline __m256 fp16x8(const uint8_t* p, int64_t stride) {
  alignas(16) uint16_t h[8];
  for (int i = 0; i < 8; ++i) h[i] = u16(p + i * stride);
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}
#endif

// The eight (scale, min) pairs of a Q4_K/Q5_K super-block (ggml-quants.c get_scale_min_k4), four at a
// time in 32-bit words as ggml_vec_dot_q4_K_q8_K unpacks them: sc[0..7] then m[0..7].
inline void scale_min_k4(const uint8_t* q, uint8_t* sc, uint8_t* m) {
  uint32_t u[3], out[4];
  std::memcpy(u, q, 12);
  const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
  out[0] = u[0] & six;                                          // sc[0..3]: low 6 bits of bytes 0-3
  out[1] = (u[2] & four) | (((u[0] >> 6) & two) << 4);         // sc[4..7]: bytes 8-11 low + bytes 0-3 top
  out[2] = u[1] & six;                                          // m[0..3]: low 6 bits of bytes 4-7
  out[3] = ((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4);  // m[4..7]: bytes 8-11 high + bytes 4-7 top
  std::memcpy(sc, out, 8);
  std::memcpy(m, out + 2, 8);
}

// Integer value j (0..31) of sub-block i of a Q4_K (hbits null) or Q5_K super-block.
inline int q45(const uint8_t* qs, const uint8_t* qh, int i, int j) {
  const int v = (qs[32 * (i / 2) + j] >> (4 * (i % 2))) & 0xF;
  return qh != nullptr ? v | (((qh[j] >> i) & 1) << 4) : v;
}

// Signed value j (-32..31) of sub-block i (0..7) of a Q6_K super-block.
inline int q6(const uint8_t* ql, const uint8_t* qh, int i, int j) {
  const int c = i / 4, s = i % 4;
  const int lo = (ql[64 * c + 32 * (s % 2) + j] >> (4 * (s / 2))) & 0xF;
  return (lo | (((qh[32 * c + j] >> (2 * s)) & 3) << 4)) - 32;
}

// Value j (0..31) of a Q4_0/Q4_1 block's unsigned 4-bit integers (IQ4_NL's codes).
inline int q4b(const uint8_t* qs, int j) { return j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4; }

// Scale ls_i - 32 (-32..31) of sub-block i (0..7) of an IQ4_XS super-block.
inline int iq4xs_scale(const uint8_t* blk, int i) {
  const int lo = (blk[4 + i / 2] >> (4 * (i % 2))) & 0xF, hi = (u16(blk + 2) >> (2 * i)) & 3;
  return (lo | (hi << 4)) - 32;
}

// Level j (0..31) of sub-block i of an IQ4_XS super-block.
inline int iq4xs(const uint8_t* blk, int i, int j) { return kIQ4NL[(blk[8 + 16 * i + j % 16] >> (4 * (j / 16))) & 0xF]; }

inline int act(const ActRow& a, int64_t i) { return 128 * a.qh[i] + a.ql[i]; }

// Q4_K (qh == false) and Q5_K: one weight row of nb / 8 super-blocks against NT activation rows.
template <int NT, bool HIGH>
void dot_q45k(const Row& w, const ActRow* a, int64_t nb, float* out) {
  constexpr int64_t bytes = HIGH ? 176 : 144;
#if defined(__AVX2__)
  __m256 acc[NT], accm[NT];  // accm: the eight sub-blocks' dmin*m * s_a, summed once at the end
  for (int t = 0; t < NT; ++t) acc[t] = accm[t] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* blk = w.q + sb * bytes;
    const float d = fp16(u16(blk)), dmin = fp16(u16(blk + 2));
    uint8_t sc[8], m[8];
    scale_min_k4(blk + 4, sc, m);
    const uint8_t* qs = blk + 16 + (HIGH ? 32 : 0);
    alignas(32) float sd[NT][8];
    const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                                            reinterpret_cast<const __m128i*>(sc)))));
    const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                                              reinterpret_cast<const __m128i*>(m)))));
    for (int t = 0; t < NT; ++t) {
      _mm256_store_ps(sd[t], _mm256_mul_ps(dsc, _mm256_loadu_ps(a[t].d + sb * 8)));
      accm[t] = _mm256_fmadd_ps(dm, _mm256_loadu_ps(a[t].s + sb * 8), accm[t]);
    }
    __m256i qh = _mm256_setzero_si256();
    if (HIGH) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    for (int i = 0; i < 8; i += 2) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 16 * i));
      __m256i w0 = _mm256_and_si256(raw, low), w1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      if (HIGH) {  // bit i (and i + 1) of qh[j] is bit 4 of value j
        const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << i)), b1 = _mm256_set1_epi8(static_cast<char>(2 << i));
        const __m256i sixteen = _mm256_set1_epi8(16);
        w0 = _mm256_or_si256(w0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen));
        w1 = _mm256_or_si256(w1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
      }
      const int64_t j0 = (sb * 8 + i) * QK, j1 = j0 + QK;
      for (int t = 0; t < NT; ++t) {
        acc[t] = _mm256_fmadd_ps(block_u(w0, a[t].qh + j0, a[t].ql + j0), _mm256_broadcast_ss(&sd[t][i]), acc[t]);
        acc[t] = _mm256_fmadd_ps(block_u(w1, a[t].qh + j1, a[t].ql + j1), _mm256_broadcast_ss(&sd[t][i + 1]), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) - hsum(accm[t]);
#else
  float acc[NT] = {}, tail[NT] = {};
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* blk = w.q + sb * bytes;
    const float d = fp16(u16(blk)), dmin = fp16(u16(blk + 2));
    uint8_t sc[8], m[8];
    scale_min_k4(blk + 4, sc, m);
    const uint8_t* qh = HIGH ? blk + 16 : nullptr;
    const uint8_t* qs = blk + 16 + (HIGH ? 32 : 0);
    for (int i = 0; i < 8; ++i) {
      const int64_t b = sb * 8 + i;
      const float dsc = d * static_cast<float>(sc[i]), dm = dmin * static_cast<float>(m[i]);
      for (int t = 0; t < NT; ++t) {
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += q45(qs, qh, i, j) * act(a[t], b * QK + j);
        acc[t] += dsc * a[t].d[b] * static_cast<float>(sumi);
        tail[t] += dm * a[t].s[b];
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t] - tail[t];
#endif
}

template <int NT>
void dot_q6k(const Row& w, const ActRow* a, int64_t nb, float* out) {
  constexpr int64_t bytes = 210;
#if defined(__AVX2__)
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* ql = w.q + sb * bytes;
    const uint8_t* qh = ql + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(ql + 192);
    const float d = fp16(u16(ql + 208));
    for (int c = 0; c < 2; ++c) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * c));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * c + 32));
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * c));
      const __m256i lo[4] = {_mm256_and_si256(l0, low), _mm256_and_si256(l1, low),
                             _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                             _mm256_and_si256(_mm256_srli_epi16(l1, 4), low)};
      const __m256i hi[4] = {_mm256_and_si256(h, three), _mm256_and_si256(_mm256_srli_epi16(h, 2), three),
                             _mm256_and_si256(_mm256_srli_epi16(h, 4), three),
                             _mm256_and_si256(_mm256_srli_epi16(h, 6), three)};
      for (int s = 0; s < 4; ++s) {
        const int i = 4 * c + s;
        // q - 32 as int8; bytes 0-15 land in lanes 0-3 (scale sc[2i]), bytes 16-31 in lanes 4-7
        const __m256i wq = _mm256_sub_epi8(_mm256_or_si256(lo[s], _mm256_slli_epi16(hi[s], 4)), off);
        const __m256 scale = _mm256_set_m128(_mm_set1_ps(d * static_cast<float>(sc[2 * i + 1])),
                                             _mm_set1_ps(d * static_cast<float>(sc[2 * i])));
        const int64_t b = sb * 8 + i;
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + b * QK, a[t].ql + b * QK),
                                   _mm256_mul_ps(scale, _mm256_set1_ps(a[t].d[b])), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
#else
  float acc[NT] = {};
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* ql = w.q + sb * bytes;
    const uint8_t* qh = ql + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(ql + 192);
    const float d = fp16(u16(ql + 208));
    for (int i = 0; i < 8; ++i) {
      const int64_t b = sb * 8 + i;
      const float s0 = d * static_cast<float>(sc[2 * i]), s1 = d * static_cast<float>(sc[2 * i + 1]);
      for (int t = 0; t < NT; ++t) {
        int lo = 0, hi = 0;
        for (int j = 0; j < QK / 2; ++j) lo += q6(ql, qh, i, j) * act(a[t], b * QK + j);
        for (int j = QK / 2; j < QK; ++j) hi += q6(ql, qh, i, j) * act(a[t], b * QK + j);
        acc[t] += a[t].d[b] * (s0 * static_cast<float>(lo) + s1 * static_cast<float>(hi));
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
#endif
}

// IQ4_XS: each sub-block's codes looked up into int8 levels (one byte shuffle per 32 values), then Q8_0's
// signed dot; the sub-block scale d * (ls_i - 32) is exact in fp32, as ggml's dequantize_row_iq4_xs forms it.
template <int NT>
void dot_iq4xs(const Row& w, const ActRow* a, int64_t nb, float* out) {
  constexpr int64_t bytes = 136;
#if defined(__AVX2__)
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* blk = w.q + sb * bytes;
    // the eight ls_i - 32 in lanes: nibble i of the 32-bit scales_l, bits 2i..2i+1 of scales_h on top
    uint32_t lo;
    std::memcpy(&lo, blk + 4, 4);
    const __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i l = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_slli_epi32(at, 2)),
                                       _mm256_set1_epi32(0xF));
    const __m256i h = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(u16(blk + 2)), _mm256_slli_epi32(at, 1)),
                                       _mm256_set1_epi32(3));
    const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(l, _mm256_slli_epi32(h, 4)), _mm256_set1_epi32(32));
    const __m256 dl = _mm256_mul_ps(_mm256_set1_ps(fp16(u16(blk))), _mm256_cvtepi32_ps(ls));
    alignas(32) float sd[NT][8];
    for (int t = 0; t < NT; ++t) _mm256_store_ps(sd[t], _mm256_mul_ps(dl, _mm256_loadu_ps(a[t].d + sb * 8)));
    for (int i = 0; i < 8; ++i) {
      const __m256i wq = _mm256_shuffle_epi8(table, nibbles(blk + 8 + 16 * i));  // codes -> int8 levels
      const int64_t j = (sb * 8 + i) * QK;
      for (int t = 0; t < NT; ++t)
        acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + j, a[t].ql + j), _mm256_broadcast_ss(&sd[t][i]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
#else
  float acc[NT] = {};
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* blk = w.q + sb * bytes;
    const float d = fp16(u16(blk));
    for (int i = 0; i < 8; ++i) {
      const int64_t b = sb * 8 + i;
      const float dl = d * static_cast<float>(iq4xs_scale(blk, i));
      for (int t = 0; t < NT; ++t) {
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += iq4xs(blk, i, j) * act(a[t], b * QK + j);
        acc[t] += dl * a[t].d[b] * static_cast<float>(sumi);
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
#endif
}

// GGUF Q8_0 (34-byte blocks, fp16 scale first) and IQ4_NL (NL: 18-byte blocks, d then 4-bit codes into
// kIQ4NL, looked up into int8 levels by one byte shuffle per block): signed int8 weights, w = d * q.
template <int NT, bool NL>
void dot_q8_0(const Row& w, const ActRow* a, int64_t nb, float* out) {
  constexpr int64_t bytes = NL ? 18 : 34;
#if defined(__AVX2__)
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  auto weights = [&](const uint8_t* blk) {
    return NL ? _mm256_shuffle_epi8(table, nibbles(blk + 2)) : load32(reinterpret_cast<const int8_t*>(blk + 2));
  };
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {  // eight blocks' scales at a time
    const uint8_t* blk = w.q + b * bytes;
    const __m256 d = fp16x8(blk, bytes);
    alignas(32) float sd[NT][8];
    for (int t = 0; t < NT; ++t) _mm256_store_ps(sd[t], _mm256_mul_ps(d, _mm256_loadu_ps(a[t].d + b)));
    for (int i = 0; i < 8; ++i) {
      const __m256i wq = weights(blk + i * bytes);
      const int64_t j = (b + i) * QK;
      for (int t = 0; t < NT; ++t)
        acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + j, a[t].ql + j), _mm256_broadcast_ss(&sd[t][i]), acc[t]);
    }
  }
  for (; b < nb; ++b) {
    const uint8_t* blk = w.q + b * bytes;
    const float d = fp16(u16(blk));
    const __m256i wq = weights(blk);
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm256_fmadd_ps(block_s(wq, a[t].qh + b * QK, a[t].ql + b * QK), _mm256_set1_ps(d * a[t].d[b]),
                               acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
#else
  float acc[NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w.q + b * bytes;
    const float d = fp16(u16(blk));
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int t = 0; t < NT; ++t) {
      int sumi = 0;
      for (int j = 0; j < QK; ++j)
        sumi += (NL ? kIQ4NL[q4b(blk + 2, j)] : static_cast<int>(q[j])) * act(a[t], b * QK + j);
      acc[t] += d * a[t].d[b] * static_cast<float>(sumi);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
#endif
}

// Value j (0..31) of a Q5_0/Q5_1 block's unsigned 5-bit integers.
inline int q5(const uint8_t* qh, const uint8_t* qs, int j) {
  const int v = j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4;
  return v | (((qh[j / 8] >> (j % 8)) & 1) << 4);
}

// Q4_0/Q5_0 (MIN = false: w = d*q - 8d, d*q - 16d) and Q4_1/Q5_1 (w = d*q + m): BITS-bit unsigned integers,
// a scale and an offset per block of 32, the offset applied through d_a * sum(a): y = d * d_a * (q . a) +
// m * s_a, llama.cpp's ggml_vec_dot_q4_1_q8_1 arithmetic (its Q4_0/Q5_0 subtract the half-range from q
// before the integer dot, the same value).
template <int NT, int BITS, bool MIN>
void dot_q45(const Row& w, const ActRow* a, int64_t nb, float* out) {
  constexpr int64_t bytes = (BITS == 5 ? 22 : 18) + (MIN ? 2 : 0), first = MIN ? 4 : 2;  // first: after d (, m)
  constexpr float half = BITS == 5 ? -16.f : -8.f;  // Q4_0/Q5_0's offset, in units of d
  float tail[NT] = {};
#if defined(__AVX2__)
  __m256 acc[NT], accm[NT];
  for (int t = 0; t < NT; ++t) acc[t] = accm[t] = _mm256_setzero_ps();
  const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull)), sixteen = _mm256_set1_epi8(16);
  auto weights = [&](const uint8_t* blk) {
    if constexpr (BITS == 4) return nibbles(blk + first);
    // Q5: byte j takes bit j of qh: qh's byte j/8, one bit tested per byte
    int32_t h32;
    std::memcpy(&h32, blk + first, 4);
    const __m256i hb = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(h32), spread), bit);
    return _mm256_or_si256(nibbles(blk + first + 4), _mm256_and_si256(_mm256_cmpeq_epi8(hb, bit), sixteen));
  };
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {  // eight blocks' scales and offsets at a time, in vectors
    const uint8_t* blk = w.q + b * bytes;
    const __m256 d = fp16x8(blk, bytes);
    const __m256 m = MIN ? fp16x8(blk + 2, bytes) : _mm256_mul_ps(d, _mm256_set1_ps(half));
    alignas(32) float sd[NT][8];
    for (int t = 0; t < NT; ++t) {
      _mm256_store_ps(sd[t], _mm256_mul_ps(d, _mm256_loadu_ps(a[t].d + b)));
      accm[t] = _mm256_fmadd_ps(m, _mm256_loadu_ps(a[t].s + b), accm[t]);
    }
    for (int i = 0; i < 8; ++i) {
      const __m256i wq = weights(blk + i * bytes);
      const int64_t j = (b + i) * QK;
      for (int t = 0; t < NT; ++t)
        acc[t] = _mm256_fmadd_ps(block_u(wq, a[t].qh + j, a[t].ql + j), _mm256_broadcast_ss(&sd[t][i]), acc[t]);
    }
  }
  for (; b < nb; ++b) {
    const uint8_t* blk = w.q + b * bytes;
    const float d = fp16(u16(blk)), m = MIN ? fp16(u16(blk + 2)) : half * d;
    const __m256i wq = weights(blk);
    for (int t = 0; t < NT; ++t) {
      acc[t] = _mm256_fmadd_ps(block_u(wq, a[t].qh + b * QK, a[t].ql + b * QK), _mm256_set1_ps(d * a[t].d[b]), acc[t]);
      tail[t] += m * a[t].s[b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) + (hsum(accm[t]) + tail[t]);
#else
  float acc[NT] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w.q + b * bytes;
    const float d = fp16(u16(blk)), m = MIN ? fp16(u16(blk + 2)) : half * d;
    const uint8_t* q = blk + first;
    for (int t = 0; t < NT; ++t) {
      int sumi = 0;
      for (int j = 0; j < QK; ++j) sumi += (BITS == 5 ? q5(q, q + 4, j) : q4b(q, j)) * act(a[t], b * QK + j);
      acc[t] += d * a[t].d[b] * static_cast<float>(sumi);
      tail[t] += m * a[t].s[b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t] + tail[t];
#endif
}

template <int NT>
void dot_blocks(Kind kind, const Row& w, const ActRow* a, int64_t nb, float* out) {
  switch (kind) {
    case Kind::Q8_0: dot_q8_0<NT, false>(w, a, nb, out); break;
    case Kind::IQ4_NL: dot_q8_0<NT, true>(w, a, nb, out); break;
    case Kind::Q4_0: dot_q45<NT, 4, false>(w, a, nb, out); break;
    case Kind::Q4_1: dot_q45<NT, 4, true>(w, a, nb, out); break;
    case Kind::Q5_0: dot_q45<NT, 5, false>(w, a, nb, out); break;
    case Kind::Q5_1: dot_q45<NT, 5, true>(w, a, nb, out); break;
    case Kind::Q4_K: dot_q45k<NT, false>(w, a, nb, out); break;
    case Kind::Q5_K: dot_q45k<NT, true>(w, a, nb, out); break;
    case Kind::IQ4_XS: dot_iq4xs<NT>(w, a, nb, out); break;
    default: dot_q6k<NT>(w, a, nb, out); break;
  }
}

// Row ``q`` (k values) of a block-format matrix as fp32, exactly as ggml's dequantize_row_*.
inline void dequantize_blocks(Kind kind, const uint8_t* q, int64_t k, float* o) {
  if (kind == Kind::Q8_0) {
    for (int64_t b = 0; b < k / QK; ++b) {
      const uint8_t* blk = q + b * 34;
      const float d = fp16(u16(blk));
      for (int j = 0; j < QK; ++j) o[b * QK + j] = d * static_cast<float>(reinterpret_cast<const int8_t*>(blk + 2)[j]);
    }
    return;
  }
  if (kind == Kind::IQ4_NL) {
    for (int64_t b = 0; b < k / QK; ++b) {
      const uint8_t* blk = q + b * 18;
      const float d = fp16(u16(blk));
      for (int j = 0; j < QK; ++j) o[b * QK + j] = d * static_cast<float>(kIQ4NL[q4b(blk + 2, j)]);
    }
    return;
  }
  if (kind == Kind::Q4_0 || kind == Kind::Q4_1) {
    const bool min = kind == Kind::Q4_1;
    for (int64_t b = 0; b < k / QK; ++b) {
      const uint8_t* blk = q + b * (min ? 20 : 18);
      const float d = fp16(u16(blk));
      for (int j = 0; j < QK; ++j) {
        const int v = q4b(blk + (min ? 4 : 2), j);
        o[b * QK + j] = min ? d * static_cast<float>(v) + fp16(u16(blk + 2)) : d * static_cast<float>(v - 8);
      }
    }
    return;
  }
  if (kind == Kind::Q5_0 || kind == Kind::Q5_1) {
    const bool min = kind == Kind::Q5_1;
    for (int64_t b = 0; b < k / QK; ++b) {
      const uint8_t* blk = q + b * (min ? 24 : 22);
      const float d = fp16(u16(blk)), m = min ? fp16(u16(blk + 2)) : -16.f * d;
      const uint8_t* qh = blk + (min ? 4 : 2);
      for (int j = 0; j < QK; ++j) o[b * QK + j] = d * static_cast<float>(q5(qh, qh + 4, j)) + m;
    }
    return;
  }
  for (int64_t sb = 0; sb < k / QK_K; ++sb, o += QK_K) {
    if (kind == Kind::IQ4_XS) {
      const uint8_t* blk = q + sb * 136;
      const float d = fp16(u16(blk));
      for (int i = 0; i < 8; ++i) {
        const float dl = d * static_cast<float>(iq4xs_scale(blk, i));
        for (int j = 0; j < QK; ++j) o[i * QK + j] = dl * static_cast<float>(iq4xs(blk, i, j));
      }
      continue;
    }
    if (kind == Kind::Q6_K) {
      const uint8_t* ql = q + sb * 210;
      const int8_t* sc = reinterpret_cast<const int8_t*>(ql + 192);
      const float d = fp16(u16(ql + 208));
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < QK; ++j)
          o[i * QK + j] = d * static_cast<float>(sc[2 * i + j / 16]) * static_cast<float>(q6(ql, ql + 128, i, j));
      continue;
    }
    const bool high = kind == Kind::Q5_K;
    const uint8_t* blk = q + sb * (high ? 176 : 144);
    const float d = fp16(u16(blk)), dmin = fp16(u16(blk + 2));
    uint8_t sc[8], m[8];
    scale_min_k4(blk + 4, sc, m);
    const uint8_t* qh = high ? blk + 16 : nullptr;
    const uint8_t* qs = blk + 16 + (high ? 32 : 0);
    for (int i = 0; i < 8; ++i) {
      const float dsc = d * static_cast<float>(sc[i]), dm = dmin * static_cast<float>(m[i]);
      for (int j = 0; j < QK; ++j) o[i * QK + j] = dsc * static_cast<float>(q45(qs, qh, i, j)) - dm;
    }
  }
}

// Bytes of one row of k values, and the Kind, of a GGML block type (0 bytes: not a type with a kernel).
inline int64_t block_row_bytes(int64_t ggml_type, int64_t k, Kind* kind) {
  switch (ggml_type) {
    case GGML_Q4_0: *kind = Kind::Q4_0; return k % QK == 0 ? k / QK * 18 : 0;
    case GGML_Q4_1: *kind = Kind::Q4_1; return k % QK == 0 ? k / QK * 20 : 0;
    case GGML_Q5_0: *kind = Kind::Q5_0; return k % QK == 0 ? k / QK * 22 : 0;
    case GGML_Q5_1: *kind = Kind::Q5_1; return k % QK == 0 ? k / QK * 24 : 0;
    case GGML_Q8_0: *kind = Kind::Q8_0; return k % QK == 0 ? k / QK * 34 : 0;
    case GGML_Q4_K: *kind = Kind::Q4_K; return k % QK_K == 0 ? k / QK_K * 144 : 0;
    case GGML_Q5_K: *kind = Kind::Q5_K; return k % QK_K == 0 ? k / QK_K * 176 : 0;
    case GGML_Q6_K: *kind = Kind::Q6_K; return k % QK_K == 0 ? k / QK_K * 210 : 0;
    case GGML_IQ4_NL: *kind = Kind::IQ4_NL; return k % QK == 0 ? k / QK * 18 : 0;
    case GGML_IQ4_XS: *kind = Kind::IQ4_XS; return k % QK_K == 0 ? k / QK_K * 136 : 0;
    case CORELM_INT4: *kind = Kind::Q4; return k % QK == 0 ? k / 2 + k / QK * 4 : 0;
    case CORELM_INT8: *kind = Kind::Q8; return k % QK == 0 ? k + k / QK * 2 : 0;
    default: return 0;
  }
}

}  // namespace corelm
