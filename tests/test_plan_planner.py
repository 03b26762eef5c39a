"""The planner's layouts, times and refusals, and the published throughput it must reproduce."""

from __future__ import annotations

import json

import pytest

from corelm.errors import CorelmError
from corelm.plan import planner as P
from corelm.plan.hardware import CATALOG, get_hardware, hardware_ids
from corelm.presets import preset


@pytest.mark.parametrize("mfu,published", [(0.33, 5_762), (0.39, 6_667)])
def test_llama3_8b_on_8_h100_matches_torchtitan_throughput(mfu, published):
    """torchtitan docs/performance.md: Llama 3.1 8B, 8×H100, FSDP, seq 8192, local batch 2: 5,762 tokens/s/GPU
    (eager) and 6,667 (torch.compile), which they report as 33% and 39% MFU."""
    w = P.Workload(task="pretrain", seq_len=8192, batch=16, tokens=1e9, zero=3, tp=1, mfu=mfu)
    d = P.plan(preset("llama-3.1-8b"), w, [get_hardware("h100-sxm")], count=8).devices[0]
    assert d.fits
    assert d.tokens_per_s_per_device == pytest.approx(published, rel=0.25)
    assert d.layout.zero == 3 and d.layout.dp == 8


def test_default_plan_picks_a_layout_that_fits_and_explains_it():
    p = P.plan(preset("llama-2-70b"), P.Workload(task="pretrain", seq_len=4096, tokens=1e9),
               [get_hardware("a100-80gb")], count=64)
    d = p.devices[0]
    assert d.fits and d.memory_total <= d.usable_bytes
    assert d.layout.zero == 3 or d.layout.tp > 1  # 70B × 16 B does not fit unsharded
    assert "sharding brings" in d.recommendation
    # Unsharded states alone would need 16 bytes × 69B parameters.
    assert p.params * 16 > get_hardware("a100-80gb").memory_bytes


def test_full_finetune_of_7b_on_one_gpu_does_not_fit_but_lora_does():
    hw = [get_hardware("a100-80gb")]
    full = P.plan(preset("llama-2-7b"), P.Workload(task="finetune", seq_len=4096, batch=8), hw, count=1).devices[0]
    assert not full.fits and "GiB" in full.reason
    lora = P.plan(preset("llama-2-7b"), P.Workload(task="finetune", method="lora", seq_len=4096, batch=8), hw,
                  count=1).devices[0]
    assert lora.fits and lora.memory_bytes["optimizer"] < 1e9
    qlora = P.plan(preset("llama-2-7b"), P.Workload(task="finetune", method="qlora", seq_len=4096, batch=8), hw,
                   count=1).devices[0]
    assert qlora.memory_bytes["frozen"] < lora.memory_bytes["frozen"] / 3  # 4-bit base weights


def test_inference_fits_where_weights_plus_kv_fit():
    p = P.plan(preset("llama-3-70b"), P.Workload(task="infer", context=8192, batch=8),
               [get_hardware(h) for h in ("l4", "h200", "mi300x")], count=1)
    fits = {d.hardware: d.fits for d in p.devices}
    assert fits == {"l4": False, "h200": False, "mi300x": True}  # 141 GB of bf16 weights alone
    assert p.kv_cache_bytes == 2 * 80 * 8 * 128 * 8192 * 8 * 2
    decode = p.devices[2]
    assert decode.decode_bound == "memory bandwidth"


def test_minimum_device_count_is_searched_when_count_is_not_given():
    p = P.plan(preset("llama-3-70b"), P.Workload(task="infer", context=4096, batch=1), [get_hardware("h100-sxm")])
    assert p.devices[0].fits and p.devices[0].count == 2


def test_profile_replaces_the_cpu_row_and_time_scales_with_measured_peak():
    cfg = preset("gpt2-tiny")
    w = P.Workload(task="pretrain", seq_len=256, batch=8, tokens=1e6, precision="fp32")
    slow = {"matmul_flops": {"fp32": 50e9}, "bandwidth_bytes_s": 20e9, "hardware": "cpu", "name": "test cpu"}
    fast = {**slow, "matmul_flops": {"fp32": 100e9}}
    t_slow = P.plan(cfg, w, [get_hardware("cpu", slow)], count=1).devices[0].step_time_s
    t_fast = P.plan(cfg, w, [get_hardware("cpu", fast)], count=1).devices[0].step_time_s
    assert t_slow == pytest.approx(2 * t_fast)
    assert get_hardware("cpu", slow).name == "test cpu"


def test_every_catalog_row_has_a_source_and_the_required_ids():
    required = {"v100", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "l4", "rtx-4090",
                "mi300x", "tpu-v4", "tpu-v5e", "tpu-v5p", "cpu"}
    assert required <= set(hardware_ids())
    for row in CATALOG.values():
        assert row.source and row.usd_per_hour > 0 and row.bandwidth_gbs > 0
        assert 0 < row.train_efficiency < row.matmul_efficiency <= 1
    assert get_hardware("h100-sxm").peak_tflops["bf16"] == 989


@pytest.mark.parametrize("kwargs,match", [
    ({"batch": 0}, "batch"), ({"tokens": -1.0}, "tokens"), ({"tp": 3}, "does not divide"),
    ({"seq_len": 100_000}, "context"), ({"mfu": 1.5}, "mfu"), ({"precision": "fp8-mixed"}, "precision"),
])
def test_impossible_settings_are_refused(kwargs, match):
    with pytest.raises(CorelmError, match=match):
        P.plan(preset("llama-2-7b"), P.Workload(task="pretrain", **kwargs), [get_hardware("h100-sxm")], count=8)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(CorelmError, match="did you mean: h100-sxm"):
        get_hardware("h100-sxn")
    with pytest.raises(CorelmError, match="did you mean: llama-3-8b"):
        preset("llama3-8b")


def test_plan_json_has_the_contract_fields():
    p = P.plan(preset("smollm2-135m"), P.Workload(task="pretrain", tokens=2e9), [get_hardware("h100-sxm")], count=1)
    out = json.loads(json.dumps(p.to_dict(), default=str))
    assert out["params"] == 134_515_008 and out["train_flops"] > 6 * 134e6 * 2e9
    dev = out["devices"][0]
    assert dev["fits"] is True and set(dev["memory_bytes"]) >= {"weights", "grads", "optimizer", "activations"}
    assert dev["memory_total_bytes"] == pytest.approx(sum(dev["memory_bytes"].values()))


def test_profile_bandwidth_efficiency_scales_decode():
    prof = {"matmul_flops": {"fp32": 100e9, "bf16": 300e9}, "bandwidth_bytes_s": 30e9, "hardware": "cpu"}
    w = P.Workload(task="infer", context=512, batch=1, dtype="bf16")
    full = P.plan(preset("smollm2-135m"), w, [get_hardware("cpu", prof)], count=1).devices[0]
    half = P.plan(preset("smollm2-135m"), w, [get_hardware("cpu", {**prof, "bandwidth_efficiency": 0.5})],
                  count=1).devices[0]
    assert half.decode_tokens_per_s == pytest.approx(full.decode_tokens_per_s / 2)
    # Bandwidth-bound: bytes of the matmul weights (bf16) + the KV cache per token ÷ 30 GB/s.
    from corelm.plan import formulas as F

    cfg = preset("smollm2-135m")
    read = F.matmul_params(cfg) * 2 + F.kv_cache_bytes(cfg, 512, 1, "bf16")
    assert full.decode_tokens_per_s == pytest.approx(30e9 / read)
