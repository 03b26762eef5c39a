"""Measure this machine and check the planner against it.

- :func:`measure_matmul` / :func:`measure_bandwidth`: achievable matmul FLOP/s per dtype and streaming-read
  bandwidth — the two numbers a roofline needs. Saved as a profile (``corelm bench --save``) they replace
  the catalog's ``cpu`` row (or a GPU row) in ``corelm plan --profile``.
- :func:`measure_train`: real corelm training steps (forward + backward + AdamW through
  ``corelm.train.loop.train``) in a *fresh subprocess* per model, reporting peak memory and step time.
  Peak memory is honest only per process: on CPU it is the rise of the kernel's resident-set high-water
  mark (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs after start-up) over the
  resident set before the model is built; tracemalloc does not see torch's allocations. On CUDA it is
  ``torch.cuda.max_memory_allocated`` (live tensors, the allocator's own count).
- :func:`measure_decode`: greedy decoding tokens/s with a KV cache, next to the bandwidth bound
  (bytes read per token ÷ measured bandwidth).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.plan import planner as P
from corelm.plan.hardware import Hardware, cpu_row

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine_name(device: str = "cpu") -> str:
    """``AMD EPYC (AVX512, 2 threads)`` or the CUDA device name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def _clock(device: str) -> Callable[[], float]:
    """Wall clock on GPUs; on CPUs, process CPU-seconds per thread — the time the work would take with
    the cores to itself, which a shared machine's wall clock cannot show (neighbours take turns)."""
    if device.startswith("cuda"):
        return time.perf_counter
    threads = torch.get_num_threads()
    return lambda: time.process_time() / threads


def measure_matmul(dtype: str, n: int = 2048, seconds: float = 1.0, device: str = "cpu") -> float:
    """Best achieved FLOP/s of an ``n×n @ n×n`` matmul in ``dtype`` over ~``seconds`` (2n³ FLOPs each).

    A dtype without a fast kernel (fp16 on most CPUs: ~0.5 GFLOP/s) is measured at 256³ only, since
    one full-size product would take minutes.
    """
    if n > 256:
        small = measure_matmul(dtype, 256, 0.0, device)
        if small < 5e9 and not device.startswith("cuda"):
            return small
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    c = torch.empty(n, n, device=device, dtype=DTYPES[dtype])
    for _ in range(2):  # warm-up: kernel selection, caches, lazy init
        torch.mm(a, b, out=c)
    _sync(device)
    clock = _clock(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        t0 = clock()
        torch.mm(a, b, out=c)
        _sync(device)
        best = max(best, 2 * n**3 / max(clock() - t0, 1e-9))
    return best


def measure_bandwidth(device: str = "cpu", mbytes: int = 512, seconds: float = 1.0) -> float:
    """Streaming-read bandwidth in bytes/s: ``x.sum()`` over a buffer far larger than the caches.

    Decode reads every weight once per token, so a read (not a copy) is the matching measurement.
    """
    x = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32, device=device)
    x.sum()
    _sync(device)
    clock = _clock(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = clock()
        x.sum()
        _sync(device)
        best = max(best, x.numel() * 4 / max(clock() - t0, 1e-9))
    return best


def measure_profile(device: str = "cpu", quick: bool = False, dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16"),
                    progress: Any = None) -> dict[str, Any]:
    """Matmul peak per dtype and bandwidth of this machine, as a profile ``corelm plan --profile`` reads."""
    seconds = 0.3 if quick else 1.0
    n = 1024 if quick else (8192 if device.startswith("cuda") else 2048)
    flops, sizes = {}, {}
    for dt in dtypes:
        if progress:
            progress(f"matmul {dt} {n}×{n}")
        flops[dt] = measure_matmul(dt, n, seconds, device)
        sizes[dt] = 256 if (flops[dt] < 5e9 and n > 256 and not device.startswith("cuda")) else n
    if progress:
        progress("memory bandwidth")
    bw = measure_bandwidth(device, 128 if quick else (4096 if device.startswith("cuda") else 512), seconds)
    mem = (torch.cuda.get_device_properties(0).total_memory if device.startswith("cuda")
           else cpu_row().memory_bytes)
    return {"hardware": "cpu" if device == "cpu" else _gpu_id(), "device": device, "name": machine_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "matmul_size": n, "matmul_sizes": sizes,
            "timing": "wall" if device.startswith("cuda") else "cpu-seconds per thread",
            "matmul_flops": flops, "bandwidth_bytes_s": bw, "memory_bytes": mem,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _gpu_id() -> str:
    """The catalog row of the CUDA device, by name (``NVIDIA H100 80GB HBM3`` -> ``h100-sxm``)."""
    name = torch.cuda.get_device_name().lower()
    for key, hw in (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100-sxm"), ("b200", "b200"),
                    ("a100-sxm4-40", "a100-40gb"), ("a100", "a100-80gb"), ("l4", "l4"), ("4090", "rtx-4090"),
                    ("v100", "v100")):
        if key in name:
            return hw
    return "cpu"


def save_profile(profile: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Activations a real model saves (used by the tests to check the Korthikanti count per tensor)


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward + loss, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), input_ids.flatten())
    return sum(seen.values())


# --------------------------------------------------------------------------------------------------
# Training: predicted vs measured

# How corelm's own modules store activations (checked by tests/test_plan_activations.py): CPU SDPA runs
# the flash kernel (no s×s scores saved); Llama's RMSNorm is written out, so it keeps x̂ as well.
def corelm_fusions(cfg: ModelConfig) -> dict[str, bool]:
    return {"fused_attention": True, "fused_norms": cfg.family != "llama"}


def predict_train(cfg: ModelConfig, hw: Hardware, *, batch: int, seq_len: int,
                  precision: str = "fp32", kernel_buffers: float = 0.0) -> dict[str, float]:
    """Planner prediction of peak bytes and step seconds for one device, no sharding or recompute.

    Args:
        kernel_buffers: bytes the matmul library keeps for the step's GEMM shapes on this machine
            (:func:`measure_kernel_buffers`); added to the peak as its own ``kernel_buffers`` entry.
    """
    w = P.Workload(task="pretrain", seq_len=seq_len, batch=batch, precision=precision, **corelm_fusions(cfg))
    layout = P.Layout(precision, 1, 1, 0, batch, 1, "none")
    mem = P.train_memory(cfg, w, layout, seq_len=seq_len)
    mem["kernel_buffers"] = float(kernel_buffers)
    t = P.train_time(cfg, w, hw, layout, seq_len=seq_len, batch=batch, count=1)
    return {"peak_bytes": sum(mem.values()), "step_s": t["step"], "model_flops": t["model_flops"],
            "memory": mem}


def available_memory_bytes(device: str = "cpu") -> float:
    """Memory a new process can use now: MemAvailable on Linux, free memory on a CUDA device."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> Callable[[], int] | None:
    """glibc's count of bytes handed out by malloc (heap + mmap'd chunks): torch's CPU tensors live there.

    This is the CPU analogue of ``torch.cuda.memory_allocated``: live bytes, without the pages glibc
    keeps mapped after ``free`` (which the RSS high-water mark includes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class _PeakSampler:
    """Samples a counter every ``interval`` seconds on a thread (torch ops release the GIL) and keeps the max."""

    def __init__(self, read: Callable[[], int], interval: float = 0.0005) -> None:
        self.read, self.interval, self.peak, self._stop = read, interval, read(), False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self.read())


class _Probe:
    """Matmul and streaming-read throughput measured *between* training steps, so a prediction uses what
    the machine delivers at that moment (a shared CPU's share changes minute to minute)."""

    def __init__(self, dtype: str, device: str, n: int = 1024, mbytes: int = 128,
                 shape: tuple[int, int, int] | None = None) -> None:
        m, k, n_ = shape or (n, n, n)  # (M, K) @ (K, N): a model's own GEMM shape, or square
        self.a = torch.randn(m, k, device=device).to(DTYPES[dtype])
        self.b = torch.randn(k, n_, device=device).to(DTYPES[dtype])
        self.c = torch.empty(m, n_, device=device, dtype=DTYPES[dtype])
        self.x = torch.ones(mbytes * 2**20 // 4, device=device)
        self.device, self.flops_per_mm = device, 2 * m * k * n_
        self.flops: list[float] = []
        self.bandwidth: list[float] = []
        self.cpu_flops: list[float] = []  # per CPU-second of this process ÷ threads (contention-free view)
        self.cpu_bandwidth: list[float] = []

    def __call__(self, seconds: float = 0.4) -> None:
        """Mean rates over ~``seconds`` (a mean, not a best: contention hits the steps on average too)."""
        count, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / 2 or count < 2:
            torch.mm(self.a, self.b, out=self.c)
            count += 1
        _sync(self.device)
        self.flops.append(self.flops_per_mm * count / (time.perf_counter() - t0))
        self.cpu_flops.append(self.flops_per_mm * count / ((time.process_time() - c0) / torch.get_num_threads()))
        count, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / 2 or count < 2:
            self.x.sum()
            count += 1
        _sync(self.device)
        self.bandwidth.append(self.x.numel() * 4 * count / (time.perf_counter() - t0))
        self.cpu_bandwidth.append(self.x.numel() * 4 * count / ((time.process_time() - c0) / torch.get_num_threads()))


def _train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a fresh interpreter: build the model, run ``steps`` corelm training steps, report."""
    from corelm.models import build_model

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = spec.get("device", "cpu")
    cfg = ModelConfig(**spec["config"])
    batch, seq, precision = spec["batch"], spec["seq_len"], spec["precision"]
    compute = "fp32" if precision == "fp32" else P._compute_dtype(precision)
    # The matmul rate is probed at the model's own MLP shape (tokens × d_model × d_ff): achievable FLOP/s
    # depends on the shape, and that GEMM carries most of a block's FLOPs.
    probe = _Probe(compute, device, shape=(batch * seq, cfg.d_model, cfg.d_ff))

    _warm_up(spec)
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    in_use = _live_bytes_counter(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_live, base_rss = in_use(), _status_kib("VmRSS") * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    with _PeakSampler(in_use) as sampler:
        model = build_model(cfg)
        times = _steps(model, cfg.vocab_size, batch, seq, spec["steps"], precision, device, probe=probe,
                       report=True)
    live = (torch.cuda.max_memory_allocated() if cuda else sampler.peak) - base_live
    return {"peak_bytes": live, "rss_peak_bytes": _status_kib("VmHWM") * 1024 - base_rss,
            "step_times": times, "params": sum(p.numel() for p in model.parameters()),
            "probe_flops": probe.flops, "probe_bandwidth": probe.bandwidth,
            "probe_cpu_flops": probe.cpu_flops, "cpu_step_times": getattr(probe, "cpu_steps", [])}


def _warm_up(spec: dict[str, Any]) -> None:
    """Run two steps of a 1-layer, 64-token-vocabulary version of the model: the kernels' one-off
    set-up (thread pools, dispatch tables) lands before the baseline. What the libraries keep per
    GEMM *shape* is not covered here: :func:`measure_kernel_buffers` measures that."""
    from corelm.models import build_model

    device = spec.get("device", "cpu")
    tiny = ModelConfig(**{**spec["config"], "n_layer": 1, "vocab_size": 64})
    _steps(build_model(tiny).to(device), 64, 2, 8, 2, spec["precision"], device)


def _live_bytes_counter(device: str) -> Callable[[], int]:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated
    return _malloc_in_use() or (lambda: 0)


def gemm_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Distinct ``(in_features, out_features)`` of every matmul weight of ``cfg``'s model, head included.

    The model is built on the ``meta`` device: shapes only, no memory.
    """
    from corelm.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return sorted({(w.shape[1], w.shape[0]) for w in _matmul_weights(model)})


def _kernel_buffers_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a fresh interpreter: after the same warm-up as the training worker, run forward and
    backward of one linear layer per GEMM shape of the step, free every tensor, and report how much
    memory stayed allocated — the matmul library's own buffers.

    Why this exists: oneMKL's fast memory manager keeps the panels it packs operands into for the life
    of the process, and their size follows the operands' shapes *and* the code path the library picks
    for the CPU (measured on AMD Zen 4: 2.5 MB after a (512×128)·(128×4096) product on the default path,
    1.75 MB with ``MKL_CBWR=COMPATIBLE``; Intel CPUs take other paths again). oneDNN's bf16 primitives
    keep reordered weights and scratchpads the same way. No formula of the model predicts these, so the
    planner takes them as a measurement of the machine, like its matmul FLOP/s.
    """
    from corelm.train.precision import Precision

    device, precision = spec.get("device", "cpu"), spec["precision"]
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    _warm_up(spec)
    policy = Precision(precision, "cuda" if device.startswith("cuda") else "cpu")
    rows = spec["batch"] * spec["seq_len"]
    in_use = _live_bytes_counter(device)
    _sync(device)
    base = in_use()
    for k, n in spec["shapes"]:
        x = torch.randn(rows, k, device=device, dtype=policy.param_dtype, requires_grad=True)
        w = torch.randn(n, k, device=device, dtype=policy.param_dtype, requires_grad=True)
        with policy.autocast():
            y = torch.nn.functional.linear(x, w)
        y.backward(torch.ones_like(y))  # the two backward GEMMs, transposed as autograd runs them
        del x, w, y
    _sync(device)
    return {"kernel_buffers_bytes": max(0, in_use() - base)}


def measure_kernel_buffers(cfg: ModelConfig, *, batch: int, seq_len: int, precision: str = "fp32",
                           device: str = "cpu", threads: int | None = None, timeout: float = 300) -> int:
    """Bytes the matmul libraries keep after a training step's GEMMs, measured in a fresh subprocess.

    This is what :func:`measure_train`'s peak contains beyond tensors: feed it to
    :func:`predict_train` as ``kernel_buffers``.
    """
    spec = {"config": cfg.to_dict(), "batch": batch, "seq_len": seq_len, "precision": precision,
            "device": device, "threads": threads or torch.get_num_threads(),
            "shapes": gemm_shapes(cfg)}
    try:
        proc = subprocess.run([sys.executable, "-m", "corelm.plan.bench", "kernel-buffers-worker",
                               json.dumps(spec)], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise CorelmError(f"kernel-buffer probe ran past {timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:]
        raise CorelmError(f"kernel-buffer probe failed: {tail[0] if tail else f'exit {proc.returncode}'}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["kernel_buffers_bytes"])


def _steps(model: torch.nn.Module, vocab: int, batch: int, seq: int, steps: int, precision: str,
           device: str, probe: _Probe | None = None, report: bool = False) -> list[float]:
    """Run ``steps`` optimizer steps through THE training loop; return the seconds of each step.

    The loop asks for one batch per step (no accumulation), so the time between two requests is one
    full step: forward, backward, clipping, AdamW. A probe, if given, runs before each step, untimed.
    """
    from corelm.train.distributed import DistInfo
    from corelm.train.loop import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    spans: list[float] = []
    cpu_spans: list[float] = []
    last = [0.0, 0.0]

    class Batches:
        def __next__(self) -> dict[str, torch.Tensor]:
            _sync(device)
            now, cpu = time.perf_counter(), time.process_time()
            if last[0]:
                spans.append(now - last[0])
                cpu_spans.append((cpu - last[1]) / torch.get_num_threads())
            if report:
                print(f"step {len(spans) + 1}/{steps}", file=sys.stderr, flush=True)
            if probe is not None:
                probe()
            last[0], last[1] = time.perf_counter(), time.process_time()
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def loss_fn(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = m(b["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten())
        return loss, b["labels"].numel()

    train(model, loss_fn, Batches(), TrainConfig(max_steps=steps, warmup_steps=1, precision=precision,
                                                 progress=False, tensorboard=False, measure_mfu=False),
          dist=DistInfo(device=torch.device(device)))
    _sync(device)
    spans.append(time.perf_counter() - last[0])
    cpu_spans.append((time.process_time() - last[1]) / torch.get_num_threads())
    if probe is not None:
        probe()
        probe.cpu_steps = cpu_spans
    return spans


def measure_train(cfg: ModelConfig, *, batch: int, seq_len: int, steps: int = 4, precision: str = "fp32",
                  device: str = "cpu", threads: int | None = None, timeout: float = 900,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run real training steps of ``cfg`` in a fresh subprocess; peak bytes and median step seconds.

    The first step (lazy optimizer-state allocation, allocator warm-up) is excluded from the median.
    ``progress`` receives the worker's "step k/n" lines as they happen.
    """
    spec = {"config": cfg.to_dict(), "batch": batch, "seq_len": seq_len, "steps": steps,
            "precision": precision, "device": device, "threads": threads or torch.get_num_threads()}
    proc = subprocess.Popen([sys.executable, "-m", "corelm.plan.bench", "train-worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:  # the worker writes "step k/n" here; anything else is kept for errors
        if line.startswith("step ") and progress:
            progress(line.strip())
        else:
            err_lines.append(line.rstrip())
        if time.monotonic() > deadline:
            proc.kill()
            raise CorelmError(f"training-step worker ran past {timeout:.0f} s; try fewer --steps or a smaller model")
    stdout = proc.stdout.read()
    code = proc.wait()
    if code != 0:
        tail = [ln for ln in err_lines if ln.strip()][-1:]
        why = tail[0] if tail else (f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit {code}")
        raise CorelmError(f"training-step worker failed: {why}")
    out = json.loads(stdout.strip().splitlines()[-1])
    times = out["step_times"]
    out["step_s"] = statistics.median(times[1:] if len(times) > 1 else times)
    return out


# --------------------------------------------------------------------------------------------------
# Decode: measured tokens/s vs the bandwidth bound


def decode_bytes_per_token(model: torch.nn.Module, cfg: ModelConfig, context: int) -> float:
    """Bytes one decode step reads: every matmul weight as stored (blocks + LM head) + the KV cache so far.

    Embedding rows are gathered (one row per token), so an untied input embedding is not read whole;
    a tied LM head reads it in full.
    """
    return sum(w.numel() * w.element_size() for w in _matmul_weights(model)) + _kv_bytes(model, cfg, context)


def _kv_bytes(model: torch.nn.Module, cfg: ModelConfig, context: int) -> float:
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context * dtype_bytes


def _matmul_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 2-D weights a decode step multiplies by: every nn.Linear and the (possibly tied) LM head."""
    out, seen = [], set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        is_matmul = isinstance(module, torch.nn.Linear) or module is getattr(model, "lm_head", None)
        if is_matmul and isinstance(w, torch.Tensor) and w.dim() == 2 and id(w) not in seen:
            seen.add(id(w))  # identity, not data_ptr: a tied head is the embedding's own Parameter, and
            out.append(w)    # every tensor on the meta device has data_ptr 0
    head = getattr(model, "lm_head", None)
    if head is not None and not isinstance(getattr(head, "weight", None), torch.Tensor):
        for name, p in model.named_parameters():  # a tied head holding the embedding by reference
            if ("embed" in name or "wte" in name) and p.dim() == 2 and id(p) not in seen:
                out.append(p)
                break
    return out


def gemv_bandwidth(shape: tuple[int, int], dtype: torch.dtype, device: str = "cpu", mbytes: int = 256) -> float:
    """Bytes/s a one-token ``F.linear`` streams for a weight of ``shape`` and ``dtype``.

    Enough distinct copies are cycled to exceed the caches, so each call reads its weight from memory —
    as a decode step does. Small matrices reach less than the copy bandwidth; this is that fraction.
    """
    size = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    ws = [torch.randn(*shape, device=device).to(dtype) for _ in range(max(2, mbytes * 2**20 // size))]
    x = torch.randn(1, shape[1], device=device).to(dtype)
    clock = _clock(device)
    best = 0.0
    for _ in range(3):
        t0 = clock()
        for w in ws:
            torch.nn.functional.linear(x, w)
        _sync(device)
        best = max(best, size * len(ws) / max(clock() - t0, 1e-9))
    return best


def aten_ops_per_step(model: torch.nn.Module, step: Callable[[], Any]) -> int:
    """Number of ATen operators one call of ``step`` dispatches (each costs a fixed framework overhead)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def op_overhead_s(device: str = "cpu", n: int = 20000) -> float:
    """Seconds of framework overhead per ATen op: a loop of adds on an 8-element tensor."""
    x = torch.zeros(8, device=device)
    clock = _clock(device)
    t0 = clock()
    for _ in range(n):
        x = x + 1
    _sync(device)
    return (clock() - t0) / n


def predict_decode(model: torch.nn.Module, cfg: ModelConfig, context: int, step: Callable[[], Any],
                   device: str = "cpu", read_bandwidth: float | None = None) -> dict[str, float]:
    """Decode seconds per token = weights ÷ their measured GEMV bandwidth + KV cache ÷ read bandwidth
    + ATen ops per step × per-op overhead. Each rate is measured here; nothing is fitted."""
    dtype = next(model.parameters()).dtype
    bw_read = read_bandwidth or measure_bandwidth(device, 256, 0.5)
    shapes: dict[tuple[int, int], float] = {}
    t_weights = 0.0
    for w in _matmul_weights(model):
        key = tuple(w.shape)
        if key not in shapes:
            shapes[key] = gemv_bandwidth(key, dtype, device)
        t_weights += w.numel() * w.element_size() / shapes[key]
    t_kv = _kv_bytes(model, cfg, context) / bw_read
    n_ops = aten_ops_per_step(model, step)
    t_op = op_overhead_s(device)
    t = t_weights + t_kv + n_ops * t_op
    read = decode_bytes_per_token(model, cfg, context)
    return {"tokens_per_s": 1 / t, "bandwidth_bound_tokens_per_s": bw_read / read, "weights_s": t_weights,
            "kv_s": t_kv, "overhead_s": n_ops * t_op, "aten_ops": n_ops, "op_overhead_s": t_op,
            "read_bandwidth": bw_read, "gemv_bandwidth": read / (t_weights + t_kv) if t_weights else bw_read,
            "bytes_per_token": read}


if __name__ == "__main__":  # the subprocess side of measure_train and measure_kernel_buffers
    _WORKERS = {"train-worker": _train_worker, "kernel-buffers-worker": _kernel_buffers_worker}
    if len(sys.argv) == 3 and sys.argv[1] in _WORKERS:
        try:  # Linux: die with the parent (an interrupted bench must not leave a training process behind)
            import signal

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        print(json.dumps(_WORKERS[sys.argv[1]](json.loads(sys.argv[2]))))
