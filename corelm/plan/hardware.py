"""The accelerator catalog, as data: one row per device with the datasheet it comes from.

Peak figures are *dense* (no 2:4 sparsity) tensor-core/matrix-unit throughput in TFLOP/s from the vendor
datasheet named in each row's ``source``. What a real program reaches is a fraction of that; those
fractions are parameters of each row (``matmul_efficiency`` for large GEMMs, ``train_efficiency`` for a
whole training step in hardware FLOPs, ``bandwidth_efficiency`` for streaming reads), never constants
hidden in a formula, and ``corelm bench --save`` replaces them with what this machine measures.
Prices are editable defaults (approximate public on-demand prices per device-hour in 2025: cloud list
prices change monthly; pass ``--price-usd`` or edit here).

No torch import: ``corelm plan`` answers without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corelm.errors import CorelmError, close_names


@dataclass
class Hardware:
    """One accelerator (or this machine's CPU).

    Attributes:
        id: catalog id used on the command line (``h100-sxm``).
        name: human name.
        peak_tflops: dense peak per compute dtype (``bf16``, ``fp16``, ``fp8``, ``tf32``, ``fp32``,
            ``int8`` in TOP/s); a dtype missing here is not supported by the matrix units.
        memory_gb: device memory in GB (1e9 bytes, as datasheets print it).
        bandwidth_gbs: peak memory bandwidth in GB/s.
        interconnect_gbs: per-device, per-direction bandwidth to peers in the same node/slice in GB/s.
        interconnect: what that link is.
        node_size: devices that share that link (a server, or a TPU slice).
        scale_out_gbs: per-device bandwidth between nodes in GB/s (e.g. 400 Gb/s InfiniBand = 50).
        power_w: board power (TDP) in watts; None where the vendor does not publish it.
        usd_per_hour: editable default price per device-hour.
        matmul_efficiency: achievable fraction of peak on large GEMMs.
        train_efficiency: achieved fraction of peak over a whole training step, in hardware FLOPs
            (forward + backward + recomputation); the step-time model divides by ``peak × this``.
        bandwidth_efficiency: achievable fraction of peak bandwidth for streaming reads (decode).
        usable_fraction: share of memory a framework can use (runtime context, allocator slack).
        source: datasheet(s) the figures come from.
    """

    id: str
    name: str
    peak_tflops: dict[str, float]
    memory_gb: float
    bandwidth_gbs: float
    interconnect_gbs: float
    interconnect: str
    node_size: int
    scale_out_gbs: float
    power_w: float | None
    usd_per_hour: float
    matmul_efficiency: float
    train_efficiency: float
    bandwidth_efficiency: float
    source: str
    usable_fraction: float = 0.95
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.usable_fraction

    def peak_flops(self, dtype: str) -> float:
        """Dense peak in FLOP/s for a compute dtype; raises if the device has no such matrix unit."""
        if dtype not in self.peak_tflops:
            raise CorelmError(f"{self.id} has no {dtype} matrix throughput "
                              f"(it has {', '.join(self.peak_tflops)})")
        return self.peak_tflops[dtype] * 1e12

    def supports(self, dtype: str) -> bool:
        return dtype in self.peak_tflops

    @property
    def fastest_16bit(self) -> str | None:
        """bf16 where supported (no loss scaling needed), else fp16, else None."""
        for dtype in ("bf16", "fp16"):
            if dtype in self.peak_tflops:
                return dtype
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Typical achievable fractions, with where they come from:
#  - large-GEMM efficiency: cuBLAS reaches ~80% of dense bf16 peak on H100 and ~85% on A100 at
#    8192-sized matmuls (NVIDIA "Matrix Multiplication Background User's Guide"); MI300X ~55% of its
#    1307 TFLOP/s peak in public hipBLASLt measurements (SemiAnalysis, Dec 2024).
#  - whole-step training efficiency: 33-39% MFU for Llama 3.1 8B on H100 (torchtitan docs/performance.md),
#    56-58% on A100 (same doc, Llama 3 8B), 46% MFU for PaLM 540B on TPU v4 (PaLM §4.1).
#  - streaming-read efficiency: ~85-90% of peak HBM bandwidth in STREAM-like kernels.
_GPU_SCALE_OUT = 50.0  # 400 Gb/s InfiniBand NDR per GPU (ConnectX-7), the usual H100/A100 cluster design

CATALOG: dict[str, Hardware] = {h.id: h for h in [
    Hardware("v100", "NVIDIA V100 SXM2 32GB", {"fp16": 125, "fp32": 15.7}, 32, 900, 150,
             "NVLink 2 (300 GB/s total)", 8, 12.5, 300, 0.90, 0.75, 0.40, 0.85,
             "NVIDIA Tesla V100 datasheet (2018): 125 TFLOPS tensor fp16, 900 GB/s HBM2, 300 W"),
    Hardware("a100-40gb", "NVIDIA A100 SXM4 40GB",
             {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5, "int8": 624}, 40, 1555, 300,
             "NVLink 3 (600 GB/s total)", 8, 25.0, 400, 1.29, 0.85, 0.50, 0.88,
             "NVIDIA A100 datasheet (2021): 312 TFLOPS bf16 dense, 1,555 GB/s HBM2, 400 W"),
    Hardware("a100-80gb", "NVIDIA A100 SXM4 80GB",
             {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5, "int8": 624}, 80, 2039, 300,
             "NVLink 3 (600 GB/s total)", 8, _GPU_SCALE_OUT, 400, 1.79, 0.85, 0.50, 0.88,
             "NVIDIA A100 datasheet (2021): 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e, 400 W"),
    Hardware("h100-sxm", "NVIDIA H100 SXM5 80GB",
             {"bf16": 989, "fp16": 989, "fp8": 1979, "tf32": 495, "fp32": 67, "int8": 1979}, 80, 3350, 450,
             "NVLink 4 (900 GB/s total)", 8, _GPU_SCALE_OUT, 700, 2.99, 0.80, 0.40, 0.88,
             "NVIDIA H100 Tensor Core GPU datasheet (2023), SXM: 989 TFLOPS bf16 dense, 3.35 TB/s, 700 W"),
    Hardware("h100-pcie", "NVIDIA H100 PCIe 80GB",
             {"bf16": 756, "fp16": 756, "fp8": 1513, "tf32": 378, "fp32": 51, "int8": 1513}, 80, 2000, 64,
             "PCIe Gen5 x16 (128 GB/s total)", 8, _GPU_SCALE_OUT, 350, 2.49, 0.80, 0.40, 0.88,
             "NVIDIA H100 Tensor Core GPU datasheet (2023), PCIe: 756 TFLOPS bf16 dense, 2 TB/s, 350 W"),
    Hardware("h200", "NVIDIA H200 SXM 141GB",
             {"bf16": 989, "fp16": 989, "fp8": 1979, "tf32": 495, "fp32": 67, "int8": 1979}, 141, 4800, 450,
             "NVLink 4 (900 GB/s total)", 8, _GPU_SCALE_OUT, 700, 3.79, 0.80, 0.40, 0.88,
             "NVIDIA H200 Tensor Core GPU datasheet (2024), SXM: 989 TFLOPS bf16 dense, 4.8 TB/s HBM3e, 700 W"),
    Hardware("b200", "NVIDIA B200 180GB",
             {"bf16": 2250, "fp16": 2250, "fp8": 4500, "fp4": 9000, "tf32": 1100, "fp32": 75, "int8": 4500},
             180, 8000, 900, "NVLink 5 (1.8 TB/s total)", 8, _GPU_SCALE_OUT, 1000, 4.99, 0.75, 0.35, 0.85,
             "NVIDIA HGX B200 / DGX B200 datasheets (2024), per GPU: 2.25 PFLOPS bf16 dense, 8 TB/s, 1000 W"),
    Hardware("l4", "NVIDIA L4 24GB",
             {"bf16": 121, "fp16": 121, "fp8": 242, "tf32": 60, "fp32": 30.3, "int8": 242}, 24, 300, 32,
             "PCIe Gen4 x16 (64 GB/s total)", 8, 3.1, 72, 0.80, 0.60, 0.30, 0.85,
             "NVIDIA L4 datasheet (2023): 121 TFLOPS bf16 dense, 300 GB/s GDDR6, 72 W"),
    Hardware("rtx-4090", "NVIDIA GeForce RTX 4090 24GB",
             {"bf16": 165, "fp16": 165, "fp8": 330, "tf32": 82.6, "fp32": 82.6, "int8": 661}, 24, 1008, 32,
             "PCIe Gen4 x16 (64 GB/s total)", 8, 3.1, 450, 0.69, 0.75, 0.40, 0.85,
             "NVIDIA Ada Lovelace architecture whitepaper (2023), RTX 4090: 165 TFLOPS bf16/fp32-acc, "
             "1,008 GB/s GDDR6X, 450 W"),
    Hardware("mi300x", "AMD Instinct MI300X 192GB",
             {"bf16": 1307, "fp16": 1307, "fp8": 2615, "tf32": 654, "fp32": 163, "int8": 2615}, 192, 5300, 448,
             "Infinity Fabric (7 links, 896 GB/s total)", 8, _GPU_SCALE_OUT, 750, 2.49, 0.55, 0.30, 0.80,
             "AMD Instinct MI300X datasheet (2023): 1,307 TFLOPS bf16 dense, 5.3 TB/s HBM3, 750 W"),
    Hardware("tpu-v4", "Google TPU v4", {"bf16": 275, "int8": 275}, 32, 1200, 300,
             "ICI, 3D torus", 4096, 300, 170, 3.22, 0.85, 0.46, 0.85,
             "Google Cloud TPU v4 docs: 275 TFLOPS bf16, 32 GiB HBM2 at 1,200 GB/s; power: Jouppi et al. "
             "2023 (TPU v4, ISCA), ~170 W mean; PaLM 540B 46% MFU"),
    Hardware("tpu-v5e", "Google TPU v5e", {"bf16": 197, "int8": 394}, 16, 819, 200,
             "ICI 1,600 Gb/s, 2D torus", 256, 200, None, 1.20, 0.85, 0.45, 0.85,
             "Google Cloud TPU v5e docs: 197 TFLOPS bf16, 16 GB HBM2 at 819 GB/s, ICI 1,600 Gbps"),
    Hardware("tpu-v5p", "Google TPU v5p", {"bf16": 459, "int8": 918}, 95, 2765, 600,
             "ICI 4,800 Gb/s, 3D torus", 8960, 600, None, 4.20, 0.85, 0.45, 0.85,
             "Google Cloud TPU v5p docs: 459 TFLOPS bf16, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbps"),
]}


def _this_machine_memory_gb() -> float:
    """Total RAM of this machine from /proc/meminfo (Linux); 16 GB elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 16.0


def cpu_row(profile: dict[str, Any] | None = None) -> Hardware:
    """This machine's CPU. Without a measured profile, figures are those measured on the corelm
    reference machine (2 cores of an AMD EPYC with AVX-512/AVX512_BF16, torch 2.13); ``corelm bench
    --save p.json`` and ``plan --profile p.json`` replace them.
    """
    row = Hardware("cpu", f"this machine's CPU ({os.cpu_count()} cores)", {"fp32": 0.139, "bf16": 0.33},
                   round(_this_machine_memory_gb(), 1), 31.5, 0.0, "none", 1, 0.0, None, 0.10,
                   1.0, 0.80, 1.0,
                   "reference-machine defaults (2-core AMD EPYC, AVX-512); run `corelm bench --save` to measure",
                   usable_fraction=0.80)
    if profile:
        apply_profile(row, profile)
    return row


def apply_profile(row: Hardware, profile: dict[str, Any]) -> Hardware:
    """Overwrite a row with what ``corelm bench --save`` measured.

    The measured matmul rates *are* achievable throughput, so the row's peak becomes the measurement
    and ``matmul_efficiency`` 1.0; ``train_efficiency`` comes from a measured training step when the
    profile has one. Bandwidth is the measured streaming-read rate (``bandwidth_efficiency`` 1.0).
    """
    try:
        row.peak_tflops = {k: v / 1e12 for k, v in profile["matmul_flops"].items() if v > 0}
        row.bandwidth_gbs = profile["bandwidth_bytes_s"] / 1e9
        if profile.get("memory_bytes"):
            row.memory_gb = profile["memory_bytes"] / 1e9
        row.matmul_efficiency = 1.0
        # Streaming reads reach the measured bandwidth; one-token GEMVs reach a measured fraction of it.
        row.bandwidth_efficiency = float(profile.get("bandwidth_efficiency", 1.0))
        if profile.get("train_efficiency"):
            row.train_efficiency = float(profile["train_efficiency"])
        if profile.get("name"):
            row.name = profile["name"]
        row.source = f"measured by corelm bench on {profile.get('name', 'this machine')}"
        row.measured = dict(profile)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CorelmError(f"the profile is missing field {exc}; make it with `corelm bench --save FILE`") from None
    return row


def load_profile(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CorelmError(f"profile not found: {path} (make one with `corelm bench --save {path}`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorelmError(f"profile {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "matmul_flops" not in data:
        raise CorelmError(f"{path} is not a corelm bench profile (no 'matmul_flops')")
    return data


def hardware_ids() -> list[str]:
    return [*CATALOG, "cpu"]


def get_hardware(hw_id: str, profile: dict[str, Any] | None = None) -> Hardware:
    """A fresh copy of a catalog row (callers may edit prices/efficiencies without touching the catalog).

    A profile applies to ``cpu``, or to the row whose id it names in ``hardware`` (a GPU profiled by
    ``corelm bench`` on that GPU).
    """
    if hw_id == "cpu":
        return cpu_row(profile if (profile and profile.get("hardware", "cpu") == "cpu") else None)
    if hw_id not in CATALOG:
        raise CorelmError(f"unknown hardware {hw_id!r}{close_names(hw_id, hardware_ids())}; "
                          f"known: {', '.join(hardware_ids())}")
    row = dataclasses.replace(CATALOG[hw_id], peak_tflops=dict(CATALOG[hw_id].peak_tflops), measured={})
    if profile and profile.get("hardware") == hw_id:
        apply_profile(row, profile)
    return row
