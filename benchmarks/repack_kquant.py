"""The repacked 8-row kernels (corelm/kernels/repack.h) against the one-row kernels (what
``CORELM_REPACK=0`` leaves a decode step on) for GGUF block matrices, per kernel build, 1 thread.

A small C++ driver includes repack.h (no ATen), fills a matrix with random valid blocks, quantizes 1 or 4
activation rows as the step does, and times the whole matrix's few-row matmul both ways, alternating
round by round; it prints the medians, the median of the per-round ratios (rows / packed) with its range,
and the largest difference of the two results relative to the largest output.

    python benchmarks/repack_kquant.py                       # Q5_K, every build this CPU runs
    python benchmarks/repack_kquant.py --types 12 13 14 20 23 --builds avx512vnni avx2

Types of 256-value super-blocks (12 Q4_K, 13 Q5_K, 14 Q6_K, 23 IQ4_XS) need K % 256 == 0: SmolLM2's
576-wide inputs are not, so their shapes here are ffn_down's 576x1536 and the 576- and 1536-row matrices
with K = 512 and 768 nearby; 32-value types (20 IQ4_NL, ...) run SmolLM2's own 576x576, 1536x576, 576x1536.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from corelm import kernels

DRIVER = r"""
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include <algorithm>
#include "repack.h"
using namespace corelm;
int main(int argc, char** argv) {
  const int kind_id = atoi(argv[1]);
  const int64_t n = atoll(argv[2]), k = atoll(argv[3]);
  const int nt = atoi(argv[4]), rounds = atoi(argv[5]), reps = atoi(argv[6]);
  Kind kind;
  const int64_t row = block_row_bytes(kind_id, k, &kind);
  if (row == 0) { printf("k %lld: no kernel\n", (long long)k); return 1; }
  std::mt19937 g(0);
  std::vector<uint8_t> q(n * row);
  for (auto& b : q) b = g() & 0xFF;
  const int64_t per = super_block_record(kind) ? QK_K : QK;
  const int64_t sbytes = row / (k / per);
  for (int64_t i = 0; i < n * (k / per); ++i) {
    uint16_t d = 0x0C00 + (g() & 0x1FF);  // fp16 scales of 2.4e-4..3.6e-4
    std::memcpy(&q[i * sbytes], &d, 2);
    const bool second = kind == Kind::Q4_K || kind == Kind::Q5_K || kind == Kind::Q4_1 || kind == Kind::Q5_1;
    if (second) std::memcpy(&q[i * sbytes + 2], &d, 2);  // dmin, m
    else std::memcpy(&q[i * sbytes + 208], &d, 2);
  }
  std::vector<float> x(nt * k);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(g);
  std::vector<int8_t> qh(nt * k), ql(nt * k);
  std::vector<float> d(nt * k / QK), s(nt * k / QK);
  for (int t = 0; t < nt; ++t)
    quantize_row(&x[t * k], k, &qh[t * k], &ql[t * k], &d[t * k / QK], &s[t * k / QK]);
  ActRow act[4];
  for (int t = 0; t < 4; ++t) {
    const int tt = std::min(t, nt - 1);
    act[t] = {&qh[tt * k], &ql[tt * k], &d[tt * k / QK], &s[tt * k / QK]};
  }
  const int64_t nb = k / QK, groups = (n + 7) / 8, gb = packed_group_bytes(kind, nb);
  std::vector<uint8_t> packed(groups * gb, 0);
  for (int64_t gi = 0; gi < groups; ++gi)
    repack_group(kind, nb, 1, std::min<int64_t>(8, n - gi * 8),
                 [&](int64_t r) { return Row{&q[(gi * 8 + r) * row], nullptr, 1}; }, &packed[gi * gb]);
  std::vector<float> yp(nt * n), yr(nt * n);
  auto run_packed = [&]() {
    float y[32];
    for (int64_t gi = 0; gi < groups; ++gi) {
      const uint8_t* p = &packed[gi * gb];
      if (nt == 1) packed_dot<1>(kind, p, act, nb, y); else packed_dot<4>(kind, p, act, nb, y);
      for (int t = 0; t < nt; ++t)
        for (int r = 0; r < 8 && gi * 8 + r < n; ++r) yp[t * n + gi * 8 + r] = y[t * 8 + r];
    }
  };
  auto run_rows = [&]() {
    float y[4];
    for (int64_t r = 0; r < n; ++r) {
      const Row w{&q[r * row], nullptr, 1};
      if (nt == 1) dot_rows<1>(kind, w, act, nb, y); else dot_rows<4>(kind, w, act, nb, y);
      for (int t = 0; t < nt; ++t) yr[t * n + r] = y[t];
    }
  };
  run_packed(); run_rows();
  double md = 0, mx = 0;
  for (int64_t i = 0; i < nt * n; ++i) {
    md = std::max(md, (double)std::fabs(yp[i] - yr[i]));
    mx = std::max(mx, (double)std::fabs(yr[i]));
  }
  std::vector<double> tp, tr;
  for (int rd = 0; rd < rounds; ++rd) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) run_packed();
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) run_rows();
    auto t2 = std::chrono::steady_clock::now();
    tp.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / reps);
    tr.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count() / reps);
  }
  std::vector<double> ratio;
  for (int i = 0; i < rounds; ++i) ratio.push_back(tr[i] / tp[i]);
  std::sort(tp.begin(), tp.end()); std::sort(tr.begin(), tr.end()); std::sort(ratio.begin(), ratio.end());
  printf("%lldx%lld T=%d packed %.1f us rows %.1f us speedup %.2fx (min %.2f max %.2f) maxdiff/max %.1e\n",
         (long long)n, (long long)k, nt, tp[rounds / 2], tr[rounds / 2], ratio[rounds / 2], ratio[0],
         ratio[rounds - 1], md / mx);
}
"""

SHAPES = [(576, 1536), (576, 512), (1536, 512), (576, 768), (1536, 768)]  # super-block types
SHAPES_32 = [(576, 576), (1536, 576), (576, 1536)]  # SmolLM2's own, for 32-value blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", type=int, nargs="+", default=[13],
                   help="GGML types: 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K, "
                        "20 IQ4_NL, 23 IQ4_XS")
    p.add_argument("--builds", nargs="+", default=[b for b in kernels.runnable_builds() if b != "avx512bf16"],
                   help="kernel builds (the flags of corelm.kernels.FLAGS)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=40, help="matmuls per timed round")
    args = p.parse_args()
    cxx = kernels._compiler()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "driver.cpp"
        src.write_text(DRIVER)
        for build in args.builds:
            exe = Path(tmp) / build
            subprocess.run([cxx, "-O3", "-std=c++17", *kernels.FLAGS[build], f"-I{kernels.SOURCE.parent}", str(src),
                            "-o", str(exe)], check=True)
            for ggml in args.types:
                for n, k in SHAPES if ggml in (12, 13, 14, 23) else SHAPES_32:
                    for t in (1, 4):
                        out = subprocess.run([str(exe), str(ggml), str(n), str(k), str(t), str(args.rounds),
                                              str(args.reps)], capture_output=True, text=True, check=True)
                        print(f"{build:11s} type {ggml}  {out.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
