// The int16 panel GEMM on AMX-INT8 tiles (Intel Sapphire Rapids and later; included by gemm.h in the AVX-512
// VNNI builds). The arithmetic is the int16 panels' to the bit: a token's 15-bit integers a = 128 h + l
// travel as two signed byte digits (h in -127..127, l in 0..127, as dot.h's quantize_row splits them), the
// weights as gemm.h's byte panel u = q + o, and TDPBSUD multiplies a digit tile (16 tokens x one block of
// 32 values) by a panel tile (8 quads of k x 16 outputs x 4 bytes) into exact int32 sums. Per block:
//   q . a = 128 (u . h) + (u . l) - o A   (A = sum(a); every term exact in int32)
// then the int16 tile's own fp32 epilogue, operation for operation, so the outputs equal the int16 panels'
// (and so the decode kernels') bit for bit; Q6_K, whose integers do not fit a byte, keeps the int16 panels.
//
// Tiles (palette 1): tmm0..3 the sums, C[digit][half] 16 tokens x 16 outputs int32; tmm4, tmm5 the h and l
// digits of 16 tokens (16 rows x 32 bytes); tmm6, tmm7 the panel's outputs 0-15 and 16-31 (8 rows x 64 bytes).
//
// Two tile backends run the one kernel: HardwareTiles (the instructions; only where amx_ready() says the CPU
// declares AMX-TILE and AMX-INT8, the OS saves tile state and Linux granted it to the process) and
// EmulatedTiles, the same operations computed in C with the instruction set's shape checks, so a CPU
// without AMX tests the kernel's addressing, configuration and epilogue (CORELM_GEMM=amx-emulated; slow).
// Before the tiles are used by default, amx_check() runs a small problem on both backends in a child process
// (corelm/kernels/__init__.py) and AMX is enabled only if they agree to the bit.
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace corelm {

// LDTILECFG's 64-byte operand, palette 1.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

inline TileConfig block_config() {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = 64;  // sums: 16 tokens x 16 int32
  for (int t = 4; t < 6; ++t) c.rows[t] = 16, c.colsb[t] = 32;  // digits: 16 tokens x 32 bytes
  for (int t = 6; t < 8; ++t) c.rows[t] = 8, c.colsb[t] = 64;   // panel halves: 8 quads x 64 bytes
  return c;
}

// The sums of one block: C[0][.] from the h digits, C[1][.] from the l digits; c (2, 16, kPanel) int32.
// A build whose assembler predates AMX (binutils < 2.36; corelm/kernels/__init__.py probes it) leaves the
// instructions out: amx_declared() is then false and these are never reached.
#if defined(CORELM_NO_AMX)
struct HardwareTiles {
  static void configure(const TileConfig&) { TORCH_CHECK(false, "this build of the kernels has no AMX"); }
  static void release() {}
  static void block(const int8_t*, const int8_t*, int64_t, const uint8_t*, int64_t, int32_t*) {
    TORCH_CHECK(false, "this build of the kernels has no AMX");
  }
};
#else
struct HardwareTiles {
  static void configure(const TileConfig& c) { asm volatile("ldtilecfg %0" ::"m"(c)); }
  static void release() { asm volatile("tilerelease" ::); }
  static void block(const int8_t* h, const int8_t* l, int64_t lda, const uint8_t* p, int64_t ldp, int32_t* c) {
    const int64_t ldc = kPanel * 4;
    asm volatile(
        "tilezero %%tmm0\n\t"
        "tilezero %%tmm1\n\t"
        "tilezero %%tmm2\n\t"
        "tilezero %%tmm3\n\t"
        "tileloadd (%0,%2,1), %%tmm4\n\t"
        "tileloadd (%1,%2,1), %%tmm5\n\t"
        "tileloadd (%3,%5,1), %%tmm6\n\t"
        "tileloadd (%4,%5,1), %%tmm7\n\t"
        "tdpbsud %%tmm6, %%tmm4, %%tmm0\n\t"
        "tdpbsud %%tmm7, %%tmm4, %%tmm1\n\t"
        "tdpbsud %%tmm6, %%tmm5, %%tmm2\n\t"
        "tdpbsud %%tmm7, %%tmm5, %%tmm3\n\t"
        "tilestored %%tmm0, (%6,%10,1)\n\t"
        "tilestored %%tmm1, (%7,%10,1)\n\t"
        "tilestored %%tmm2, (%8,%10,1)\n\t"
        "tilestored %%tmm3, (%9,%10,1)\n\t"
        :
        : "r"(h), "r"(l), "r"(lda), "r"(p), "r"(p + 64), "r"(ldp), "r"(c), "r"(c + 16), "r"(c + 16 * kPanel),
          "r"(c + 16 * kPanel + 16), "r"(ldc)
        : "memory");
  }
};
#endif

// The same operations in C, with the shape rules under which the instructions would fault.
struct EmulatedTiles {
  struct State {
    TileConfig cfg;
    bool configured = false;
    alignas(64) uint8_t tile[8][16 * 64];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void configure(const TileConfig& c) {
    TORCH_CHECK(c.palette == 1 && c.start_row == 0, "tile configuration: palette 1, start row 0");
    for (int t = 0; t < 16; ++t) TORCH_CHECK(c.rows[t] <= 16 && c.colsb[t] <= 64, "tile ", t, ": at most 16 x 64 bytes");
    State& s = state();
    s.cfg = c;
    s.configured = true;
    std::memset(s.tile, 0, sizeof(s.tile));  // LDTILECFG zeroes the tiles
  }
  static void release() { state().configured = false; }
  static void zero(int t) { std::memset(state().tile[t], 0, 16 * 64); }
  static void load(int t, const void* base, int64_t stride) {
    State& s = state();
    TORCH_CHECK(s.configured && s.cfg.rows[t] > 0, "TILELOADD of an unconfigured tile");
    for (int r = 0; r < s.cfg.rows[t]; ++r)
      std::memcpy(s.tile[t] + 64 * r, static_cast<const uint8_t*>(base) + r * stride, s.cfg.colsb[t]);
  }
  static void store(int t, void* base, int64_t stride) {
    State& s = state();
    TORCH_CHECK(s.configured && s.cfg.rows[t] > 0, "TILESTORED of an unconfigured tile");
    for (int r = 0; r < s.cfg.rows[t]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.tile[t] + 64 * r, s.cfg.colsb[t]);
  }
  // TDPBSUD: C[m][n] += sum over k of signed A[m][4k + j] times unsigned B[k][4n + j].
  static void dpbsud(int c, int a, int b) {
    State& s = state();
    const TileConfig& g = s.cfg;
    TORCH_CHECK(s.configured && g.colsb[a] == 4 * g.rows[b] && g.rows[c] == g.rows[a] && g.colsb[c] == g.colsb[b] &&
                    g.colsb[c] % 4 == 0,
                "TDPBSUD: tile shapes that would fault");
    for (int m = 0; m < g.rows[c]; ++m) {
      int32_t* cm = reinterpret_cast<int32_t*>(s.tile[c] + 64 * m);
      const int8_t* am = reinterpret_cast<const int8_t*>(s.tile[a] + 64 * m);
      for (int n = 0; n < g.colsb[c] / 4; ++n)
        for (int k = 0; k < g.colsb[a] / 4; ++k)
          for (int j = 0; j < 4; ++j) cm[n] += static_cast<int32_t>(am[4 * k + j]) * s.tile[b][64 * k + 4 * n + j];
    }
  }
  static void block(const int8_t* h, const int8_t* l, int64_t lda, const uint8_t* p, int64_t ldp, int32_t* c) {
    const int64_t ldc = kPanel * 4;
    for (int t = 0; t < 4; ++t) zero(t);
    load(4, h, lda);
    load(5, l, lda);
    load(6, p, ldp);
    load(7, p + 64, ldp);
    dpbsud(0, 4, 6);
    dpbsud(1, 4, 7);
    dpbsud(2, 5, 6);
    dpbsud(3, 5, 7);
    store(0, c, ldc);
    store(1, c + 16, ldc);
    store(2, c + 16 * kPanel, ldc);
    store(3, c + 16 * kPanel + 16, ldc);
  }
};

// x (T, K) -> quantize_rows_i16's d, s and integers a (T, K; the int16 panels' tokens, so the same), split into
// digits h, l (Tp, K; rows T .. Tp zero) with a = 128 h + l (h = a >> 7, l = a & 127), and A = sum(a) per block.
inline void quantize_rows_digits(const float* x, int64_t T, int64_t Tp, int64_t K, int16_t* a, int8_t* h, int8_t* l,
                                 float* d, float* s, int32_t* asum) {
  quantize_rows_i16(x, T, K, a, d, s);
  std::memset(h + T * K, 0, (Tp - T) * K);
  std::memset(l + T * K, 0, (Tp - T) * K);
  Pool::parallel_for(T, 16, [&](int64_t begin, int64_t end) {
    const __m512i low7 = _mm512_set1_epi32(127);
    for (int64_t b = begin * K / QK; b < end * K / QK; ++b) {
      __m512i v[2];
      for (int i = 0; i < 2; ++i) {
        v[i] = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + b * QK + 16 * i)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(h + b * QK + 16 * i), _mm512_cvtepi32_epi8(_mm512_srai_epi32(v[i], 7)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(l + b * QK + 16 * i), _mm512_cvtepi32_epi8(_mm512_and_si512(v[i], low7)));
      }
      asum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(v[0], v[1]));
    }
  });
}

// y (T, kPanel) row stride ldy = the tokens' digits times a byte panel p (K/4, kPanel) words: per 16 tokens,
// per block the tile sums, then panel_tile_int's epilogue (acc: 16 x kPanel floats, c: 2 x 16 x kPanel int32).
template <class Tiles, bool MIN>
void panel_tiles_amx(const int8_t* h, const int8_t* l, const float* da, const float* sa, const int32_t* asum, int off,
                     int64_t T, int64_t K, const uint32_t* p, const float* dw, const float* mw, float* y, int64_t ldy,
                     int32_t* c, float* acc) {
  const int64_t nb = K / QK;
  const uint8_t* pb = reinterpret_cast<const uint8_t*>(p);
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t rows = std::min<int64_t>(16, T - t0);
    std::fill(acc, acc + 16 * kPanel, 0.f);
    for (int64_t b = 0; b < nb; ++b) {
      Tiles::block(h + t0 * K + b * QK, l + t0 * K + b * QK, K, pb + b * (QK / 4) * kPanel * 4, kPanel * 4, c);
      const __m512 d0 = _mm512_loadu_ps(dw + b * kPanel), d1 = _mm512_loadu_ps(dw + b * kPanel + 16);
      const __m512 m0 = MIN ? _mm512_loadu_ps(mw + b * kPanel) : d0, m1 = MIN ? _mm512_loadu_ps(mw + b * kPanel + 16) : d1;
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t ti = (t0 + t) * nb + b;
        const __m512 dt = _mm512_set1_ps(da[ti]), st = _mm512_set1_ps(MIN ? sa[ti] : 0.f);
        const __m512i corr = _mm512_set1_epi32(-off * asum[ti]);
        for (int half = 0; half < 2; ++half) {
          const int32_t* ch = c + t * kPanel + 16 * half;
          const __m512i sum = _mm512_add_epi32(
              _mm512_add_epi32(_mm512_slli_epi32(_mm512_loadu_si512(ch), 7), _mm512_loadu_si512(ch + 16 * kPanel)), corr);
          float* at = acc + t * kPanel + 16 * half;
          __m512 a = _mm512_loadu_ps(at);
          if (MIN) a = _mm512_fmadd_ps(half ? m1 : m0, st, a);
          a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(half ? d1 : d0, dt), a);
          _mm512_storeu_ps(at, a);
        }
      }
    }
    for (int64_t t = 0; t < rows; ++t) std::memcpy(y + (t0 + t) * ldy, acc + t * kPanel, kPanel * sizeof(float));
  }
}

// CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), OSXSAVE, XCR0 bits 17-18 (the OS saves TILECFG and
// TILEDATA), and Linux's per-process grant of TILEDATA (arch_prctl ARCH_REQ_XCOMP_PERM; process-wide, so
// the pool's threads may use tiles too).
inline bool amx_declared() {
#if defined(CORELM_NO_AMX)
  return false;
#endif
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;
  unsigned lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return false;
#if defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
#else
  return false;
#endif
}

// A small problem (two blocks, 20 tokens: a partial tile) on both backends, compared to the bit.
inline bool amx_self_check() {
  constexpr int64_t T = 20, Tp = 32, K = 64, nb = K / QK;
  alignas(64) int8_t h[Tp * K], l[Tp * K];
  alignas(64) uint32_t p[K / 4 * kPanel];
  float da[T * nb], sa[T * nb], dw[nb * kPanel], mw[nb * kPanel], y0[T * kPanel], y1[T * kPanel], acc[16 * kPanel];
  int32_t asum[T * nb];
  alignas(64) int32_t c[2 * 16 * kPanel];
  uint32_t r = 12345;
  auto next = [&r] { return r = r * 1664525u + 1013904223u, r >> 8; };
  for (int64_t i = 0; i < Tp * K; ++i) h[i] = static_cast<int8_t>(next() % 255 - 127), l[i] = static_cast<int8_t>(next() % 128);
  for (auto& w : p) w = next() * 2654435761u;
  for (int64_t i = 0; i < T * nb; ++i) da[i] = 1e-3f * (next() % 100 + 1), sa[i] = 1e-2f * (next() % 100), asum[i] = next() % 4096;
  for (int64_t i = 0; i < nb * kPanel; ++i) dw[i] = 1e-3f * (next() % 100 + 1), mw[i] = -1e-2f * (next() % 100);
  EmulatedTiles::configure(block_config());
  panel_tiles_amx<EmulatedTiles, true>(h, l, da, sa, asum, 128, T, K, p, dw, mw, y0, kPanel, c, acc);
  EmulatedTiles::release();
  HardwareTiles::configure(block_config());
  panel_tiles_amx<HardwareTiles, true>(h, l, da, sa, asum, 128, T, K, p, dw, mw, y1, kPanel, c, acc);
  HardwareTiles::release();
  return std::memcmp(y0, y1, sizeof(y0)) == 0;
}

// What this process's first look at the tiles found: 0 the tiles ran the small problem and agreed with
// their C emulation to the bit, 1 no tiles (the CPU, the OS or this build has none), 2 they disagreed.
// corelm/kernels/__init__.py runs it in a child process once per build and CPU, so a fault on the tiles
// costs a warning, not the command that met it; only then does it call amx_enable().
inline int64_t amx_check() {
  if (!amx_declared()) return 1;
  return amx_self_check() ? 0 : 2;
}

inline std::atomic<bool>& amx_verified() {
  static std::atomic<bool> verified{false};
  return verified;
}

// The child's verdict for this build and CPU was 0: the default int16 arithmetic runs on tiles from now on
// (amx_declared() asks Linux for this process's tile state first; false leaves everything as it was).
inline bool amx_enable() {
  amx_verified().store(amx_declared());
  return amx_verified().load();
}

// Whether the default int16 arithmetic runs on tiles (CORELM_GEMM=amx needs it too).
inline bool amx_ready() { return amx_verified().load(); }

}  // namespace corelm

namespace corelm {

// y_i (T, N_i) = x (T, K) @ W_i^T on byte panels and tiles (every matrix's integers fit a byte: int8_fits).
template <class Tiles, class Matrix>
void amx_matmul(const float* x, int64_t T, int64_t K, const std::vector<Matrix>& ms, const std::vector<float*>& outs,
                int64_t panels) {
  const int64_t nb = K / QK, Tp = (T + 15) / 16 * 16;
  int8_t* h = scratch<int8_t, 0>(2 * Tp * K);  // the caller's: the workers use Tag 1-4 only
  int8_t* l = h + Tp * K;
  int16_t* a = scratch<int16_t, 0>(T * K);
  float* da = scratch<float, 0>(2 * T * nb);
  float* sa = da + T * nb;
  int32_t* asum = scratch<int32_t, 0>(T * nb);
  quantize_rows_digits(x, T, Tp, K, a, h, l, da, sa, asum);
  byte_panels(T, K, ms, outs, panels,
              [&](const uint32_t* p, const float* dw, const float* mw, int off, bool min, float* out, int64_t ld) {
                int32_t* c = scratch<int32_t, 4>(2 * 16 * kPanel);
                float* acc = scratch<float, 4>(16 * kPanel);
                Tiles::configure(block_config());  // a thread's own tile state
                if (min) {
                  panel_tiles_amx<Tiles, true>(h, l, da, sa, asum, off, T, K, p, dw, mw, out, ld, c, acc);
                } else {
                  panel_tiles_amx<Tiles, false>(h, l, da, sa, asum, off, T, K, p, dw, mw, out, ld, c, acc);
                }
                Tiles::release();
              });
}

}  // namespace corelm
