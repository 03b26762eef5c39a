#!/usr/bin/env bash
# Benchmark peer, never part of `make test`: llama.cpp's llama-bench, llama-server and llama-quantize, built
# from the llama.cpp sources vendored in the llama-cpp-python sdist (the package registry is the only
# network a machine here has), with flags chosen from what this CPU declares, plus a Q4_K_M of the
# embedded SmolLM2 made by llama.cpp's own quantizer.
#
#   bash scripts/build_llamacpp.sh [DIR]        (default .bench/llama.cpp; ~10 min per build on 2 cores)
#
# DIR/build        GGML_NATIVE=OFF with the AVX-512 (VNNI, BF16) flags the CPU has, else AVX2: no AMX.
#                  Its prompts and its decode are both timed.
# DIR/build-avx2   AVX2 flags only (llama-bench): the peer of corelm's AVX2 build (CORELM_KERNELS_ISA=avx2).
# DIR/build-native GGML_NATIVE=ON, only where the CPU declares amx_tile (llama-bench): llama.cpp's AMX path,
#                  which crashed on multi-token batches on an AMX Xeon, so it is timed on decode only
#                  (benchmarks/prefill.py --llama-bench-decode).
# DIR/smollm2-Q4_K_M.gguf   llama-quantize --allow-requantize of the embedded Q4_1 file.
# Builds already in DIR are kept; delete DIR to rebuild.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-.bench/llama.cpp}
PY=${PY:-.venv/bin/python}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -d "$SRC" ]; then
  echo "llama.cpp: fetching the llama-cpp-python $VERSION sdist" >&2
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR"
  tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
COMMON=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
AVX2=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
if has avx512f && has avx512bw && has avx512vl; then
  MAIN=("${AVX2[@]}" -DGGML_AVX512=ON)
  has avx512_vnni && MAIN+=(-DGGML_AVX512_VNNI=ON)
  has avx512_bf16 && MAIN+=(-DGGML_AVX512_BF16=ON)
else
  MAIN=("${AVX2[@]}")
fi

build() {  # name, targets, cmake flags...
  local name=$1 targets=$2
  shift 2
  local have=1 t
  for t in $targets; do [ -x "$SRC/$name/bin/$t" ] || have=0; done
  if [ "$have" = 1 ]; then
    echo "llama.cpp $name: kept ($SRC/$name)" >&2
    return
  fi
  echo "llama.cpp $name: building ($*)" >&2
  cmake -S "$SRC" -B "$SRC/$name" "${COMMON[@]}" "$@" > "$DIR/$name.cmake.log" 2>&1
  # shellcheck disable=SC2086
  cmake --build "$SRC/$name" -j "$(nproc)" --target $targets > "$DIR/$name.build.log" 2>&1 ||
    { tail -20 "$DIR/$name.build.log" >&2; exit 1; }
}

build build "llama-bench llama-server llama-quantize" "${MAIN[@]}"
build build-avx2 llama-bench "${AVX2[@]}"
if has amx_tile; then
  build build-native llama-bench -DGGML_NATIVE=ON
fi
for b in build build-avx2 build-native; do
  [ -d "$SRC/$b/bin" ] && ln -sfn "$SRC/$b/bin" "$DIR/$b"
done
if [ ! -f "$DIR/smollm2-Q4_K_M.gguf" ]; then
  q41=$("$PY" -c "from corelm.presets import embedded_path; print(embedded_path('smollm2-135m-instruct'))")
  "$DIR/build/llama-quantize" --allow-requantize "$q41" "$DIR/smollm2-Q4_K_M.gguf" Q4_K_M "$(nproc)" \
    > "$DIR/quantize.log" 2>&1
fi
for b in build build-avx2 build-native; do [ -L "$DIR/$b" ] && echo "llama.cpp $b: $DIR/$b/" >&2; done
echo "llama.cpp Q4_K_M: $DIR/smollm2-Q4_K_M.gguf" >&2
