// Weight rows interleaved eight at a time for the few-row (decode) matmul (included once, by qlinear.h).
//
// The row kernels of dot.h and kquants.h take one weight row at a time: each 32-value block is
// unpacked, multiplied with the activation block in 8 int32 lanes, and the lanes are summed at the
// end of the row. Repacked once at load (as llama.cpp's CPU "repack" buffers do), eight rows share
// one record per block: 32-bit lane r of every vector holds four consecutive values of row r, so one
// broadcast of four activation values feeds all eight rows, lane r ends the block holding row r's
// whole integer dot product, and no horizontal sum is left. Per block and row that is about 5 vector
// operations instead of 12 (measured on SmolLM2's 576x576 Q4_1 matrix, Zen 4: see qlinear.h).
//
// Records (per group of 8 rows, per 32-value block b; row r, lane bytes i = 0..3):
//   Q4    qs[128] | scale bf16[8] | zero bf16[8]                       160 bytes = 8 x (16 + 4)
//   Q4_0  qs[128] | d fp16[8]                                          144 bytes = 8 x 18
//   IQ4_NL  as Q4_0 (its blocks are Q4_0's bytes, the nibbles codes into kIQ4NL)
//   Q4_1  qs[128] | d fp16[8] | m fp16[8]                              160 bytes = 8 x 20
//   Q5_0  qs[128] | hb[32] | d fp16[8]                                 176 bytes = 8 x 22
//   Q5_1  qs[128] | hb[32] | d fp16[8] | m fp16[8]                     192 bytes = 8 x 24
//   Q8    q[256]  | scale bf16[8]                                      272 bytes
//   Q8_0  q[256]  | d fp16[8]                                          272 bytes = 8 x 34
// qs[32v + 4r + i] = byte 4v + i of row r's packed nibbles (low nibble: value 4v + i, high: 16 + 4v + i),
// so vector u = 0..7 (low nibbles of load u, then high nibbles of load u - 4) holds values 4u..4u+3;
// q[32u + 4r + i] = value 4u + i; hb holds bit 4 of value 4u + i of row r as bit u of hb[4r + i] (bit planes,
// AVX2 and generic builds) or as bit 4r + i of the 32-bit word hb[4u..4u+3] (masks, AVX-512 builds).
//   Q4_K  per super-block of 256 values: d fp16[8] | dmin fp16[8] | sc[8 sub][8 rows] | m[8][8] |
//         qs[4 pairs][256], qs[256c + 32v + 4r + i] = byte 32c + 4v + i of row r's qs (low nibble:
//         sub-block 2c, high: 2c + 1, value 4v + i)                   1184 bytes = 8 x 148
//   Q5_K  Q4_K's record | qh[256], qh[32v + 4r + i] = byte 4v + i of row r's qh (bit s: bit 4 of value
//         4v + i of sub-block s)                                      1440 bytes = 8 x 180
//   Q6_K  per super-block: ql[4 ranges][256] | qh[2 ranges][256] | sc int8[16][8 rows] | d fp16[8], each
//         range of 32 bytes of a row (ql[32j ...], qh[32j ...]) interleaved as qs above
//                                                                    1680 bytes = 8 x 210
//   IQ4_XS per super-block: d fp16[8] | ls - 32 int8[8 sub][8 rows] | qs[8 sub][128], sub-block i's 16
//         bytes of each row interleaved as Q4_0's qs                 1104 bytes = 8 x 138
// Rows past N (the last group of a matrix whose N is not a multiple of 8) are zeros and are not stored.
// The integer arithmetic is the row kernels' and the Python references': exact block dot products
// (here whole-block sums in one int32 lane, converted to fp32 once, as the references' sumi.float()),
// then the fp32 scales.
#pragma once

#include <memory>

#include "dot.h"
#include "kquants.h"

namespace corelm {

constexpr int64_t kGroup = 8;  // weight rows per repacked group

// The kernels' helpers must inline: a call spills the eight weight vectors (measured 2x slower on Q5_0).
#define CORELM_INLINE inline __attribute__((always_inline))

// Q5's fifth bits: as AVX-512 masks, one 32-bit word per vector (bit 4r + i: row r's value 4u + i), where
// the build has masked byte adds; else as bit planes, byte 4r + i holding bit u for vector u.
#if defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(CORELM_Q5_PLANES)
#define CORELM_Q5_MASKS 1
#endif

// Whether a kind's records hold a 256-value super-block (the K-quants) rather than one 32-value block.
inline bool super_block_record(Kind kind) {
  return kind == Kind::Q4_K || kind == Kind::Q5_K || kind == Kind::Q6_K || kind == Kind::IQ4_XS;
}

// Bytes of one group's record for block (or, for the K-quants, super-block) b; 0: the kind is not repacked.
inline int64_t packed_record(Kind kind) {
  switch (kind) {
    case Kind::Q4:
    case Kind::Q4_1: return 160;
    case Kind::Q4_0:
    case Kind::IQ4_NL: return 144;
    case Kind::IQ4_XS: return 1104;
    case Kind::Q5_0: return 176;
    case Kind::Q5_1: return 192;
    case Kind::Q8:
    case Kind::Q8_0: return 272;
    case Kind::Q4_K: return 1184;
    case Kind::Q5_K: return 1440;
    case Kind::Q6_K: return 1680;
    default: return 0;
  }
}

inline int64_t packed_group_bytes(Kind kind, int64_t nb) {
  return super_block_record(kind) ? nb / 8 * packed_record(kind) : nb * packed_record(kind);
}

// Writes group g's record (rows 8g..8g+7 of a matrix with n rows) for every block; ``row(r)`` gives row
// r's bytes in the original layout and ``scales(r)`` its bf16 scales (corelm's Q4/Q8).
template <typename RowFn>
void repack_group(Kind kind, int64_t nb, int64_t bpg, int64_t rows, RowFn row, uint8_t* out) {
  const int64_t rec = packed_record(kind);
  auto put16 = [](uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); };
  for (int64_t r = 0; r < rows; ++r) {
    const Row w = row(r);
    if (kind == Kind::Q6_K) {
      for (int64_t sb = 0; sb < nb / 8; ++sb) {
        const uint8_t* blk = w.q + sb * 210;
        uint8_t* o = out + sb * rec;
        for (int j = 0; j < 6; ++j)  // ql's four 32-byte ranges, then qh's two
          for (int v = 0; v < 8; ++v) std::memcpy(o + 256 * j + 32 * v + 4 * r, blk + 32 * j + 4 * v, 4);
        for (int i = 0; i < 16; ++i) o[1536 + 8 * i + r] = blk[192 + i];
        put16(o + 1664 + 2 * r, u16(blk + 208));
      }
      continue;
    }
    if (kind == Kind::IQ4_XS) {
      for (int64_t sb = 0; sb < nb / 8; ++sb) {
        const uint8_t* blk = w.q + sb * 136;
        uint8_t* o = out + sb * rec;
        put16(o + 2 * r, u16(blk));
        for (int i = 0; i < 8; ++i) {
          o[16 + 8 * i + r] = static_cast<uint8_t>(static_cast<int8_t>(iq4xs_scale(blk, i)));
          for (int v = 0; v < 4; ++v) std::memcpy(o + 80 + 128 * i + 32 * v + 4 * r, blk + 8 + 16 * i + 4 * v, 4);
        }
      }
      continue;
    }
    if (kind == Kind::Q4_K || kind == Kind::Q5_K) {
      const bool high = kind == Kind::Q5_K;
      for (int64_t sb = 0; sb < nb / 8; ++sb) {
        const uint8_t* blk = w.q + sb * (high ? 176 : 144);
        const uint8_t* qs = blk + (high ? 48 : 16);
        uint8_t* o = out + sb * rec;
        put16(o + 2 * r, u16(blk));
        put16(o + 16 + 2 * r, u16(blk + 2));
        uint8_t sc[8], m[8];
        scale_min_k4(blk + 4, sc, m);
        for (int i = 0; i < 8; ++i) {
          o[32 + 8 * i + r] = sc[i];
          o[96 + 8 * i + r] = m[i];
        }
        for (int c = 0; c < 4; ++c)
          for (int v = 0; v < 8; ++v) std::memcpy(o + 160 + 256 * c + 32 * v + 4 * r, qs + 32 * c + 4 * v, 4);
        if (high)
          for (int v = 0; v < 8; ++v) std::memcpy(o + 1184 + 32 * v + 4 * r, blk + 16 + 4 * v, 4);
      }
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = out + b * rec;
      switch (kind) {
        case Kind::Q4: {
          for (int v = 0; v < 4; ++v) std::memcpy(o + 32 * v + 4 * r, w.q + b * 16 + 4 * v, 4);
          put16(o + 128 + 2 * r, w.s[2 * (b / bpg)]);
          put16(o + 144 + 2 * r, w.s[2 * (b / bpg) + 1]);
          break;
        }
        case Kind::Q4_0:
        case Kind::IQ4_NL:
        case Kind::Q4_1: {
          const bool min = kind == Kind::Q4_1;
          const uint8_t* blk = w.q + b * (min ? 20 : 18);
          for (int v = 0; v < 4; ++v) std::memcpy(o + 32 * v + 4 * r, blk + (min ? 4 : 2) + 4 * v, 4);
          put16(o + 128 + 2 * r, u16(blk));
          if (min) put16(o + 144 + 2 * r, u16(blk + 2));
          break;
        }
        case Kind::Q5_0:
        case Kind::Q5_1: {
          const bool min = kind == Kind::Q5_1;
          const uint8_t* blk = w.q + b * (min ? 24 : 22);
          uint32_t qh;
          std::memcpy(&qh, blk + (min ? 4 : 2), 4);
          for (int v = 0; v < 4; ++v) std::memcpy(o + 32 * v + 4 * r, blk + (min ? 8 : 6) + 4 * v, 4);
#if defined(CORELM_Q5_MASKS)
          for (int u = 0; u < 8; ++u) o[128 + 4 * u + r / 2] |= static_cast<uint8_t>(((qh >> (4 * u)) & 0xF) << (4 * (r % 2)));
#else
          for (int i = 0; i < 4; ++i) {
            uint8_t bits = 0;
            for (int u = 0; u < 8; ++u) bits |= static_cast<uint8_t>(((qh >> (4 * u + i)) & 1) << u);
            o[128 + 4 * r + i] = bits;
          }
#endif
          put16(o + 160 + 2 * r, u16(blk));
          if (min) put16(o + 176 + 2 * r, u16(blk + 2));
          break;
        }
        case Kind::Q8: {
          for (int u = 0; u < 8; ++u) std::memcpy(o + 32 * u + 4 * r, w.q + b * 32 + 4 * u, 4);
          put16(o + 256 + 2 * r, w.s[b / bpg]);
          break;
        }
        default: {  // Q8_0
          const uint8_t* blk = w.q + b * 34;
          for (int u = 0; u < 8; ++u) std::memcpy(o + 32 * u + 4 * r, blk + 2 + 4 * u, 4);
          put16(o + 256 + 2 * r, u16(blk));
          break;
        }
      }
    }
  }
}

// The inverse of repack_group: rows 0..rows-1 of a group's record ``in`` back into their file bytes
// (corelm's Q4/Q8: the rows of CORELM_INT4/CORELM_INT8, kquants.h, a scale per block), ``row(r)`` row r's
// writable bytes. Every field is moved, not recomputed, except Q4_K/Q5_K's 12 bytes of 6-bit scales and
// mins and IQ4_XS's scales_h/scales_l, whose packings are bijections (96 and 48 bits) re-encoded here.
template <typename RowFn>
void unpack_group(Kind kind, int64_t nb, int64_t rows, const uint8_t* in, RowFn row) {
  const int64_t rec = packed_record(kind);
  auto put16 = [](uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); };
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* w = row(r);
    if (kind == Kind::Q6_K) {
      for (int64_t sb = 0; sb < nb / 8; ++sb) {
        uint8_t* blk = w + sb * 210;
        const uint8_t* o = in + sb * rec;
        for (int j = 0; j < 6; ++j)
          for (int v = 0; v < 8; ++v) std::memcpy(blk + 32 * j + 4 * v, o + 256 * j + 32 * v + 4 * r, 4);
        for (int i = 0; i < 16; ++i) blk[192 + i] = o[1536 + 8 * i + r];
        put16(blk + 208, u16(o + 1664 + 2 * r));
      }
      continue;
    }
    if (kind == Kind::IQ4_XS) {
      for (int64_t sb = 0; sb < nb / 8; ++sb) {
        uint8_t* blk = w + sb * 136;
        const uint8_t* o = in + sb * rec;
        put16(blk, u16(o + 2 * r));
        uint16_t high = 0;
        std::memset(blk + 4, 0, 4);
        for (int i = 0; i < 8; ++i) {
          const int ls = static_cast<int8_t>(o[16 + 8 * i + r]) + 32;  // 6 bits
          blk[4 + i / 2] |= static_cast<uint8_t>((ls & 0xF) << (4 * (i % 2)));
          high |= static_cast<uint16_t>((ls >> 4) << (2 * i));
          for (int v = 0; v < 4; ++v) std::memcpy(blk + 8 + 16 * i + 4 * v, o + 80 + 128 * i + 32 * v + 4 * r, 4);
        }
        put16(blk + 2, high);
      }
      continue;
    }
    if (kind == Kind::Q4_K || kind == Kind::Q5_K) {
      const bool high = kind == Kind::Q5_K;
      for (int64_t sb = 0; sb < nb / 8; ++sb) {
        uint8_t* blk = w + sb * (high ? 176 : 144);
        uint8_t* qs = blk + (high ? 48 : 16);
        const uint8_t* o = in + sb * rec;
        put16(blk, u16(o + 2 * r));
        put16(blk + 2, u16(o + 16 + 2 * r));
        for (int j = 0; j < 4; ++j) {  // scale_min_k4's packing, inverted
          const uint8_t s0 = o[32 + 8 * j + r], s4 = o[32 + 8 * (j + 4) + r];
          const uint8_t m0 = o[96 + 8 * j + r], m4 = o[96 + 8 * (j + 4) + r];
          blk[4 + j] = static_cast<uint8_t>(s0 | ((s4 >> 4) << 6));
          blk[8 + j] = static_cast<uint8_t>(m0 | ((m4 >> 4) << 6));
          blk[12 + j] = static_cast<uint8_t>((s4 & 0xF) | ((m4 & 0xF) << 4));
        }
        for (int c = 0; c < 4; ++c)
          for (int v = 0; v < 8; ++v) std::memcpy(qs + 32 * c + 4 * v, o + 160 + 256 * c + 32 * v + 4 * r, 4);
        if (high)
          for (int v = 0; v < 8; ++v) std::memcpy(blk + 16 + 4 * v, o + 1184 + 32 * v + 4 * r, 4);
      }
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* o = in + b * rec;
      switch (kind) {
        case Kind::Q4_0:
        case Kind::IQ4_NL:
        case Kind::Q4_1: {
          const bool min = kind == Kind::Q4_1;
          uint8_t* blk = w + b * (min ? 20 : 18);
          for (int v = 0; v < 4; ++v) std::memcpy(blk + (min ? 4 : 2) + 4 * v, o + 32 * v + 4 * r, 4);
          put16(blk, u16(o + 128 + 2 * r));
          if (min) put16(blk + 2, u16(o + 144 + 2 * r));
          break;
        }
        case Kind::Q5_0:
        case Kind::Q5_1: {
          const bool min = kind == Kind::Q5_1;
          uint8_t* blk = w + b * (min ? 24 : 22);
          uint32_t qh = 0;
#if defined(CORELM_Q5_MASKS)
          for (int u = 0; u < 8; ++u) qh |= static_cast<uint32_t>((o[128 + 4 * u + r / 2] >> (4 * (r % 2))) & 0xF) << (4 * u);
#else
          for (int i = 0; i < 4; ++i)
            for (int u = 0; u < 8; ++u) qh |= static_cast<uint32_t>((o[128 + 4 * r + i] >> u) & 1) << (4 * u + i);
#endif
          std::memcpy(blk + (min ? 4 : 2), &qh, 4);
          for (int v = 0; v < 4; ++v) std::memcpy(blk + (min ? 8 : 6) + 4 * v, o + 32 * v + 4 * r, 4);
          put16(blk, u16(o + 160 + 2 * r));
          if (min) put16(blk + 2, u16(o + 176 + 2 * r));
          break;
        }
        case Kind::Q8_0: {
          uint8_t* blk = w + b * 34;
          for (int u = 0; u < 8; ++u) std::memcpy(blk + 2 + 4 * u, o + 32 * u + 4 * r, 4);
          put16(blk, u16(o + 256 + 2 * r));
          break;
        }
        case Kind::Q4: {  // CORELM_INT4's row: nibbles, then (scale, zero) per block
          for (int v = 0; v < 4; ++v) std::memcpy(w + b * 16 + 4 * v, o + 32 * v + 4 * r, 4);
          put16(w + nb * 16 + 4 * b, u16(o + 128 + 2 * r));
          put16(w + nb * 16 + 4 * b + 2, u16(o + 144 + 2 * r));
          break;
        }
        case Kind::Q8: {  // CORELM_INT8's row: values, then a scale per block
          for (int u = 0; u < 8; ++u) std::memcpy(w + b * 32 + 4 * u, o + 32 * u + 4 * r, 4);
          put16(w + nb * 32 + 2 * b, u16(o + 256 + 2 * r));
          break;
        }
        default: break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernels: one group (8 weight rows) against NT activation rows; out[t * 8 + r] = row r . activation t.
// Every activation row goes through the same operations whatever NT is (see dot_q4).
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX2__)
// acc + per-lane sums of four u8 * s8 products
CORELM_INLINE __m256i dp(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

CORELM_INLINE __m256i bcast4(const int8_t* p) {  // four activation values into every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

CORELM_INLINE __m256 bf16x8(const uint8_t* p) {  // eight bf16 -> fp32
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

CORELM_INLINE __m256 fp16x8c(const uint8_t* p) {  // eight contiguous fp16 -> fp32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Ask for the bytes `ahead` of the record being read while it is computed: a decode step streams each
// weight byte once, and without it the loads wait on memory between records (qlinear.h's prefetch_ahead()).
CORELM_INLINE void prefetch_record(const uint8_t* p, int64_t bytes, int64_t ahead) {
  if (ahead != 0) prefetch_bytes(p + ahead, bytes);
}

// Eight unsigned weight vectors (values 4u..4u+3 of eight rows) of a Q4/Q5 record.
template <bool HIGH>
CORELM_INLINE void unsigned_vectors(const uint8_t* rec, __m256i* w) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int v = 0; v < 4; ++v) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 * v));
    w[v] = _mm256_and_si256(raw, low);
    w[v + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
  }
#if defined(CORELM_Q5_MASKS)
  if (HIGH) {  // hb holds a 32-bit mask per vector: bit 4r + i adds 16 to byte 4r + i
    const __m256i b4 = _mm256_set1_epi8(16);
    for (int u = 0; u < 8; ++u) {
      uint32_t k;
      std::memcpy(&k, rec + 128 + 4 * u, 4);
      w[u] = _mm256_mask_add_epi8(w[u], _cvtu32_mask32(k), w[u], b4);
    }
  }
#else
  if (HIGH) {  // bit u of each byte of hb is bit 4 of vector u's byte: move it to bit 4
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 128)), b4 = _mm256_set1_epi8(16);
    w[0] = _mm256_or_si256(w[0], _mm256_and_si256(_mm256_slli_epi16(hb, 4), b4));
    w[1] = _mm256_or_si256(w[1], _mm256_and_si256(_mm256_slli_epi16(hb, 3), b4));
    w[2] = _mm256_or_si256(w[2], _mm256_and_si256(_mm256_slli_epi16(hb, 2), b4));
    w[3] = _mm256_or_si256(w[3], _mm256_and_si256(_mm256_slli_epi16(hb, 1), b4));
    w[4] = _mm256_or_si256(w[4], _mm256_and_si256(hb, b4));
    w[5] = _mm256_or_si256(w[5], _mm256_and_si256(_mm256_srli_epi16(hb, 1), b4));
    w[6] = _mm256_or_si256(w[6], _mm256_and_si256(_mm256_srli_epi16(hb, 2), b4));
    w[7] = _mm256_or_si256(w[7], _mm256_and_si256(_mm256_srli_epi16(hb, 3), b4));
  }
#endif
}

// Whole-block integer dot products of eight unsigned weight vectors with activation block j0 of row a:
// lane r = sum over the 32 values of q_r * (128 h + l), exact (|.| < 2^24 for 5-bit weights).
CORELM_INLINE __m256i block_dots_u(const __m256i* w, const ActRow& a, int64_t j0) {
  __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
  for (int u = 0; u < 8; u += 2) {
    h0 = dp(h0, w[u], bcast4(a.qh + j0 + 4 * u));
    l0 = dp(l0, w[u], bcast4(a.ql + j0 + 4 * u));
    h1 = dp(h1, w[u + 1], bcast4(a.qh + j0 + 4 * u + 4));
    l1 = dp(l1, w[u + 1], bcast4(a.ql + j0 + 4 * u + 4));
  }
  return _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(h0, h1), 7), _mm256_add_epi32(l0, l1));
}

// The same for eight signed weight vectors (int8): h takes w's sign, l (0..127) multiplies w directly.
CORELM_INLINE __m256i block_dots_s(const __m256i* w, const __m256i* aw, const ActRow& a, int64_t j0) {
  __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
  for (int u = 0; u < 8; u += 2) {
    h0 = dp(h0, aw[u], _mm256_sign_epi8(bcast4(a.qh + j0 + 4 * u), w[u]));
    l0 = dp(l0, bcast4(a.ql + j0 + 4 * u), w[u]);
    h1 = dp(h1, aw[u + 1], _mm256_sign_epi8(bcast4(a.qh + j0 + 4 * u + 4), w[u + 1]));
    l1 = dp(l1, bcast4(a.ql + j0 + 4 * u + 4), w[u + 1]);
  }
  return _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(h0, h1), 7), _mm256_add_epi32(l0, l1));
}

// 16 values (four signed vectors) of activation row a from j0: lane r = exact integer dot of row r
CORELM_INLINE __m256i half_dots_s(const __m256i* w, const __m256i* aw, const ActRow& a, int64_t j0) {
  __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
  for (int u = 0; u < 4; u += 2) {
    h0 = dp(h0, aw[u], _mm256_sign_epi8(bcast4(a.qh + j0 + 4 * u), w[u]));
    l0 = dp(l0, bcast4(a.ql + j0 + 4 * u), w[u]);
    h1 = dp(h1, aw[u + 1], _mm256_sign_epi8(bcast4(a.qh + j0 + 4 * u + 4), w[u + 1]));
    l1 = dp(l1, bcast4(a.ql + j0 + 4 * u + 4), w[u + 1]);
  }
  return _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(h0, h1), 7), _mm256_add_epi32(l0, l1));
}

// Q4, Q4_0, Q4_1, Q5_0, Q5_1: y_r = sum_b scale_rb * d_a[b] * dot + m_rb * s_a[b]
template <Kind K, int NT>
void packed_unsigned(const uint8_t* p, const ActRow* a, int64_t nb, float* out, int64_t ahead) {
  constexpr bool high = K == Kind::Q5_0 || K == Kind::Q5_1;
  const int64_t rec = packed_record(K);
  __m256 acc[NT], accm[NT];
  for (int t = 0; t < NT; ++t) acc[t] = accm[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, p += rec) {
    prefetch_record(p, rec, ahead);
    __m256i w[8];
    unsigned_vectors<high>(p, w);
    __m256 scale, m;
    if (K == Kind::Q4) {  // w = q * scale + (zero - 8 * scale)
      scale = bf16x8(p + 128);
      m = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, bf16x8(p + 144));
    } else if (K == Kind::Q4_0 || K == Kind::Q4_1) {  // the file's fp16 d (and m) as they are
      scale = fp16x8c(p + 128);
      m = K == Kind::Q4_1 ? fp16x8c(p + 144) : _mm256_mul_ps(scale, _mm256_set1_ps(-8.f));
    } else {
      scale = fp16x8c(p + 160);
      m = K == Kind::Q5_1 ? fp16x8c(p + 176) : _mm256_mul_ps(scale, _mm256_set1_ps(-16.f));
    }
    for (int t = 0; t < NT; ++t) {
      const __m256 dot = _mm256_cvtepi32_ps(block_dots_u(w, a[t], b * QK));
      acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(a[t].d[b])), acc[t]);
      accm[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(a[t].s[b]), accm[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(acc[t], accm[t]));
}

// Q8 (bf16 scales), Q8_0 (fp16)
template <Kind K, int NT>
void packed_signed(const uint8_t* p, const ActRow* a, int64_t nb, float* out, int64_t ahead) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, p += 272) {
    prefetch_record(p, 272, ahead);
    __m256i w[8], aw[8];
    for (int u = 0; u < 8; ++u) {
      w[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * u));
      aw[u] = _mm256_sign_epi8(w[u], w[u]);
    }
    const __m256 scale = K == Kind::Q8 ? bf16x8(p + 256) : fp16x8c(p + 256);
    for (int t = 0; t < NT; ++t) {
      const __m256 dot = _mm256_cvtepi32_ps(block_dots_s(w, aw, a[t], b * QK));
      acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(a[t].d[b])), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

// Q5_K's fifth bits: 16 added to each byte of w whose byte of h has bit s set (sub-block s).
CORELM_INLINE __m256i add_bit4(__m256i w, __m256i h, int s) {
#if defined(CORELM_Q5_MASKS)
  return _mm256_mask_add_epi8(w, _mm256_test_epi8_mask(h, _mm256_set1_epi8(static_cast<char>(1 << s))), w,
                              _mm256_set1_epi8(16));
#else  // bit s moved to bit 4 (a 16-bit shift by at most 4 keeps each byte's bit 4 within the byte)
  const __m256i b = s < 4 ? _mm256_slli_epi16(h, 4 - s) : _mm256_srli_epi16(h, s - 4);
  return _mm256_or_si256(w, _mm256_and_si256(b, _mm256_set1_epi8(16)));
#endif
}

// The eight vectors of a Q4_0-like record's codes as IQ4 int8 levels w (and |w|, for block_dots_s).
CORELM_INLINE void iq4_vectors(const uint8_t* rec, __m256i* w, __m256i* aw) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  unsigned_vectors<false>(rec, w);
  for (int u = 0; u < 8; ++u) {
    w[u] = _mm256_shuffle_epi8(table, w[u]);
    aw[u] = _mm256_sign_epi8(w[u], w[u]);
  }
}

// IQ4_NL (per block, d_rb: its record's fp16[8] at 128) and IQ4_XS (per sub-block, d_r * (ls_ri - 32)):
// y_r = sum_b scale_rb * d_a[b] * (level . a)
template <Kind K, int NT>
void packed_iq4(const uint8_t* p, const ActRow* a, int64_t nb, float* out, int64_t ahead) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = K == Kind::IQ4_NL ? p + b * 144 : p + (b / 8) * 1104;
    const int i = static_cast<int>(b % 8);
    if (K == Kind::IQ4_NL) prefetch_record(rec, 144, ahead);
    else if (i == 0) prefetch_record(rec, 1104, ahead);
    __m256i w[8], aw[8];
    iq4_vectors(K == Kind::IQ4_NL ? rec : rec + 80 + 128 * i, w, aw);
    const __m256 scale =
        K == Kind::IQ4_NL
            ? fp16x8c(rec + 128)
            : _mm256_mul_ps(fp16x8c(rec), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec + 16 + 8 * i)))));
    for (int t = 0; t < NT; ++t) {
      const __m256 dot = _mm256_cvtepi32_ps(block_dots_s(w, aw, a[t], b * QK));
      acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(a[t].d[b])), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

// Q4_K (HIGH false) and Q5_K: y_r = sum_i (d_r * sc_ri) * d_a * dot_i - (dmin_r * m_ri) * s_a
template <int NT, bool HIGH>
void packed_q45k(const uint8_t* p, const ActRow* a, int64_t nb, float* out, int64_t ahead) {
  constexpr int64_t rec = HIGH ? 1440 : 1184;
  __m256 acc[NT], accm[NT];
  for (int t = 0; t < NT; ++t) acc[t] = accm[t] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < nb / 8; ++sb, p += rec) {
    prefetch_record(p, rec, ahead);
    const __m256 d = fp16x8c(p), dmin = fp16x8c(p + 16);
    for (int c = 0; c < 4; ++c) {
      __m256i w0[8], w1[8];
      for (int v = 0; v < 8; ++v) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 160 + 256 * c + 32 * v));
        w0[v] = _mm256_and_si256(raw, low);
        w1[v] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        if (HIGH) {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 1184 + 32 * v));
          w0[v] = add_bit4(w0[v], h, 2 * c);
          w1[v] = add_bit4(w1[v], h, 2 * c + 1);
        }
      }
      for (int s = 0; s < 2; ++s) {
        const int i = 2 * c + s;
        const int64_t b = sb * 8 + i;
        const __m256 sc = _mm256_mul_ps(
            d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 32 + 8 * i)))));
        const __m256 m = _mm256_mul_ps(
            dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 96 + 8 * i)))));
        for (int t = 0; t < NT; ++t) {
          const __m256 dot = _mm256_cvtepi32_ps(block_dots_u(s == 0 ? w0 : w1, a[t], b * QK));
          acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sc, _mm256_set1_ps(a[t].d[b])), acc[t]);
          accm[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(a[t].s[b]), accm[t]);
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_sub_ps(acc[t], accm[t]));
}
// Q6_K: y_r = sum_i d_a * d_r * (sc_r,2i * dot(lo half) + sc_r,2i+1 * dot(hi half)), q - 32 signed
template <int NT>
void packed_q6k(const uint8_t* p, const ActRow* a, int64_t nb, float* out, int64_t ahead) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
  for (int64_t sb = 0; sb < nb / 8; ++sb, p += 1680) {
    prefetch_record(p, 1680, ahead);
    const __m256 d = fp16x8c(p + 1664);
    for (int i = 0; i < 8; ++i) {  // sub-block i = 4c + s: ql range 2c + s % 2 (nibble s / 2), qh range c (bits 2s)
      const int c = i / 4, s = i % 4;
      const uint8_t* ql = p + 256 * (2 * c + s % 2);
      const uint8_t* qh = p + 1024 + 256 * c;
      __m256i w[8], aw[8];
      for (int v = 0; v < 8; ++v) {
        __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32 * v));
        if (s >= 2) lo = _mm256_srli_epi16(lo, 4);
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * v));
        const __m256i hi = s == 3 ? _mm256_srli_epi16(h, 2) : _mm256_slli_epi16(h, 4 - 2 * s);  // bits 2s, 2s+1 -> 4, 5
        w[v] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(lo, low), _mm256_and_si256(hi, two)), off);
        aw[v] = _mm256_sign_epi8(w[v], w[v]);
      }
      const __m256 s0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 1536 + 16 * i)))));
      const __m256 s1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 1544 + 16 * i)))));
      const int64_t j0 = (sb * 8 + i) * QK;
      for (int t = 0; t < NT; ++t) {
        const __m256 lo = _mm256_cvtepi32_ps(half_dots_s(w, aw, a[t], j0));
        const __m256 hi = _mm256_cvtepi32_ps(half_dots_s(w + 4, aw + 4, a[t], j0 + 16));
        acc[t] = _mm256_fmadd_ps(_mm256_fmadd_ps(lo, s0, _mm256_mul_ps(hi, s1)), _mm256_set1_ps(a[t].d[sb * 8 + i]),
                                 acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}
#else
// The scalar statement of the same records (the generic build): value j of row r in block record p.
inline int packed_value(Kind kind, const uint8_t* p, int r, int j) {
  const int u = j / 4, i = j % 4;
  if (kind == Kind::Q8 || kind == Kind::Q8_0) return static_cast<int8_t>(p[32 * u + 4 * r + i]);
  int v = (p[32 * (u % 4) + 4 * r + i] >> (u < 4 ? 0 : 4)) & 0xF;
  if (kind == Kind::Q5_0 || kind == Kind::Q5_1) v |= ((p[128 + 4 * r + i] >> u) & 1) << 4;
  return kind == Kind::IQ4_NL ? kIQ4NL[v] : v;
}

template <Kind K, int NT>
void packed_scalar(const uint8_t* p, const ActRow* a, int64_t nb, float* out) {
  float acc[NT][8] = {}, accm[NT][8] = {};
  const int64_t rec = packed_record(K);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = p + (super_block_record(K) ? (b / 8) * rec : b * rec);
    for (int r = 0; r < 8; ++r) {
      if (K == Kind::Q6_K) {  // sub-block i = 4c + s, value j: ql range 2c + s % 2, qh range c
        const int i = static_cast<int>(b % 8), c = i / 4, s = i % 4;
        const float d = fp16(u16(blk + 1664 + 2 * r));
        const float s0 = d * static_cast<float>(static_cast<int8_t>(blk[1536 + 16 * i + r]));
        const float s1 = d * static_cast<float>(static_cast<int8_t>(blk[1544 + 16 * i + r]));
        for (int t = 0; t < NT; ++t) {
          int half[2] = {0, 0};
          for (int j = 0; j < QK; ++j) {
            const int at = 32 * (j / 4) + 4 * r + j % 4;
            const int lo = (blk[256 * (2 * c + s % 2) + at] >> (4 * (s / 2))) & 0xF;
            const int hi = (blk[1024 + 256 * c + at] >> (2 * s)) & 3;
            half[j / 16] += ((lo | (hi << 4)) - 32) * act(a[t], b * QK + j);
          }
          acc[t][r] += (static_cast<float>(half[0]) * s0 + static_cast<float>(half[1]) * s1) * a[t].d[b];
        }
        continue;
      }
      float scale, m = 0.f;
      if (K == Kind::IQ4_XS) {  // sub-block b % 8: a Q4_0-like record of codes at 80 + 128 i
        const int i = static_cast<int>(b % 8);
        scale = fp16(u16(blk + 2 * r)) * static_cast<float>(static_cast<int8_t>(blk[16 + 8 * i + r]));
        for (int t = 0; t < NT; ++t) {
          int sumi = 0;
          for (int j = 0; j < QK; ++j)
            sumi += kIQ4NL[packed_value(Kind::Q4_0, blk + 80 + 128 * i, r, j)] * act(a[t], b * QK + j);
          acc[t][r] += static_cast<float>(sumi) * (scale * a[t].d[b]);
        }
        continue;
      }
      if (K == Kind::Q4_K || K == Kind::Q5_K) {  // sub-block b % 8: low (even) or high (odd) nibbles (+ qh bit)
        const int i = static_cast<int>(b % 8);
        scale = fp16(u16(blk + 2 * r)) * static_cast<float>(blk[32 + 8 * i + r]);
        m = -(fp16(u16(blk + 16 + 2 * r)) * static_cast<float>(blk[96 + 8 * i + r]));
        const uint8_t* q = blk + 160 + 256 * (i / 2);
        for (int t = 0; t < NT; ++t) {
          int sumi = 0;
          for (int j = 0; j < QK; ++j) {
            const int at = 32 * (j / 4) + 4 * r + j % 4;
            int v = (q[at] >> (4 * (i % 2))) & 0xF;
            if (K == Kind::Q5_K) v |= ((blk[1184 + at] >> i) & 1) << 4;
            sumi += v * act(a[t], b * QK + j);
          }
          acc[t][r] += static_cast<float>(sumi) * (scale * a[t].d[b]);
          accm[t][r] += m * a[t].s[b];
        }
        continue;
      }
      if (K == Kind::Q4) {
        scale = bf16(u16(blk + 128 + 2 * r));
        m = bf16(u16(blk + 144 + 2 * r)) - 8.f * scale;
      } else if (K == Kind::Q4_0 || K == Kind::Q4_1 || K == Kind::IQ4_NL) {  // IQ4_NL: w = d * level, no offset
        scale = fp16(u16(blk + 128 + 2 * r));
        m = K == Kind::Q4_1 ? fp16(u16(blk + 144 + 2 * r)) : K == Kind::Q4_0 ? -8.f * scale : 0.f;
      } else if (K == Kind::Q8 || K == Kind::Q8_0) {
        scale = K == Kind::Q8 ? bf16(u16(blk + 256 + 2 * r)) : fp16(u16(blk + 256 + 2 * r));
      } else {
        scale = fp16(u16(blk + 160 + 2 * r));
        m = K == Kind::Q5_1 ? fp16(u16(blk + 176 + 2 * r)) : -16.f * scale;
      }
      for (int t = 0; t < NT; ++t) {
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += packed_value(K, blk, r, j) * act(a[t], b * QK + j);
        acc[t][r] += static_cast<float>(sumi) * (scale * a[t].d[b]);
        accm[t][r] += m * a[t].s[b];
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < 8; ++r) out[8 * t + r] = acc[t][r] + accm[t][r];
}
#endif

// One group against NT activation rows: out (NT, 8). ahead: how far on to prefetch, in bytes (0: not at all).
template <int NT>
void packed_dot(Kind kind, const uint8_t* p, const ActRow* a, int64_t nb, float* out, int64_t ahead) {
#if defined(__AVX2__)
  switch (kind) {
    case Kind::Q4: packed_unsigned<Kind::Q4, NT>(p, a, nb, out, ahead); break;
    case Kind::Q4_0: packed_unsigned<Kind::Q4_0, NT>(p, a, nb, out, ahead); break;
    case Kind::Q4_1: packed_unsigned<Kind::Q4_1, NT>(p, a, nb, out, ahead); break;
    case Kind::Q5_0: packed_unsigned<Kind::Q5_0, NT>(p, a, nb, out, ahead); break;
    case Kind::Q5_1: packed_unsigned<Kind::Q5_1, NT>(p, a, nb, out, ahead); break;
    case Kind::Q8: packed_signed<Kind::Q8, NT>(p, a, nb, out, ahead); break;
    case Kind::Q8_0: packed_signed<Kind::Q8_0, NT>(p, a, nb, out, ahead); break;
    case Kind::Q5_K: packed_q45k<NT, true>(p, a, nb, out, ahead); break;
    case Kind::Q6_K: packed_q6k<NT>(p, a, nb, out, ahead); break;
    case Kind::IQ4_NL: packed_iq4<Kind::IQ4_NL, NT>(p, a, nb, out, ahead); break;
    case Kind::IQ4_XS: packed_iq4<Kind::IQ4_XS, NT>(p, a, nb, out, ahead); break;
    default: packed_q45k<NT, false>(p, a, nb, out, ahead); break;
  }
#else
  (void)ahead;
  switch (kind) {
    case Kind::Q4: packed_scalar<Kind::Q4, NT>(p, a, nb, out); break;
    case Kind::Q4_0: packed_scalar<Kind::Q4_0, NT>(p, a, nb, out); break;
    case Kind::Q4_1: packed_scalar<Kind::Q4_1, NT>(p, a, nb, out); break;
    case Kind::Q5_0: packed_scalar<Kind::Q5_0, NT>(p, a, nb, out); break;
    case Kind::Q5_1: packed_scalar<Kind::Q5_1, NT>(p, a, nb, out); break;
    case Kind::Q8: packed_scalar<Kind::Q8, NT>(p, a, nb, out); break;
    case Kind::Q8_0: packed_scalar<Kind::Q8_0, NT>(p, a, nb, out); break;
    case Kind::Q5_K: packed_scalar<Kind::Q5_K, NT>(p, a, nb, out); break;
    case Kind::Q6_K: packed_scalar<Kind::Q6_K, NT>(p, a, nb, out); break;
    case Kind::IQ4_NL: packed_scalar<Kind::IQ4_NL, NT>(p, a, nb, out); break;
    case Kind::IQ4_XS: packed_scalar<Kind::IQ4_XS, NT>(p, a, nb, out); break;
    default: packed_scalar<Kind::Q4_K, NT>(p, a, nb, out); break;
  }
#endif
}

}  // namespace corelm
