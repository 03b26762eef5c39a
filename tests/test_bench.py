"""corelm bench: the measurements are sane, the decode byte count is exact, real training steps land on
the predicted peak memory, and the profile feeds `corelm plan`. No speed is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from corelm.cli import main
from corelm.config import ModelConfig
from corelm.plan import bench as B
from corelm.plan.hardware import get_hardware, load_profile


def test_probes_return_plausible_rates():
    flops = B.measure_matmul("fp32", n=256, seconds=0.05)
    bw = B.measure_bandwidth(mbytes=16, seconds=0.05)
    assert 1e8 < flops < 1e16 and 1e8 < bw < 1e13


def test_decode_bytes_count_every_matmul_weight_once_plus_kv():
    from corelm.models import build_model

    cfg = ModelConfig(family="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                      max_seq_len=64, tie_embeddings=True)
    model = build_model(cfg)
    d, kv = 64, 2 * 16
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * 96  # q, k, v, o, gate, up, down
    expected = (2 * per_layer + 256 * d) * 4 + 2 * 2 * 2 * 16 * 10 * 4  # + tied head; KV at 10 tokens
    assert B.decode_bytes_per_token(model, cfg, 10) == expected


def test_aten_op_count_grows_with_depth():
    from corelm.models import build_model

    counts = []
    for n_layer in (1, 2):
        cfg = ModelConfig(family="gpt2", vocab_size=64, n_layer=n_layer, n_head=2, d_model=32, max_seq_len=16)
        model = build_model(cfg)
        ids = torch.zeros(1, 4, dtype=torch.long)
        counts.append(B.aten_ops_per_step(model, lambda m=model, x=ids: m(x)))
    assert counts[1] > counts[0] > 10


@pytest.mark.slow
def test_real_training_steps_land_on_the_predicted_peak_memory():
    """Fresh subprocess, corelm's training loop, AdamW: live bytes at the peak within 15% of the planner.

    The planner's formulas give tensors; what the matmul library keeps per GEMM shape depends on the CPU
    (oneMKL packs operands differently on Intel and AMD) and is measured by its own probe.
    """
    cfg = ModelConfig(family="gpt2", name="bench-test", vocab_size=4096, n_layer=2, n_head=2, d_model=128,
                      max_seq_len=128)
    m = B.measure_train(cfg, batch=4, seq_len=128, steps=2)
    hw = get_hardware("cpu")
    kernel_buffers = B.measure_kernel_buffers(cfg, batch=4, seq_len=128)
    pred = B.predict_train(cfg, hw, batch=4, seq_len=128, kernel_buffers=kernel_buffers)
    assert pred["memory"]["kernel_buffers"] == kernel_buffers >= 0
    assert m["params"] == 4096 * 128 + 128 * 128 + 2 * (12 * 128 * 128 + 13 * 128) + 2 * 128
    assert pred["peak_bytes"] == pytest.approx(m["peak_bytes"], rel=0.15)
    assert len(m["step_times"]) == 2 and m["rss_peak_bytes"] > 0


def test_gemm_shapes_cover_every_linear_and_the_head():
    cfg = ModelConfig(family="gpt2", name="bench-test", vocab_size=4096, n_layer=2, n_head=2, d_model=128,
                      max_seq_len=128)
    # c_attn, attention c_proj, c_fc, MLP c_proj, tied head: (in_features, out_features)
    assert B.gemm_shapes(cfg) == [(128, 128), (128, 384), (128, 512), (128, 4096), (512, 128)]


def test_profile_round_trip_feeds_plan(tmp_path, capsys):
    prof = B.measure_profile(quick=True, dtypes=("fp32",))
    path = tmp_path / "profile.json"
    B.save_profile(prof, path)
    assert load_profile(path)["matmul_flops"]["fp32"] == prof["matmul_flops"]["fp32"]
    row = get_hardware("cpu", load_profile(path))
    assert row.peak_tflops == {"fp32": prof["matmul_flops"]["fp32"] / 1e12}
    assert main(["plan", "--model", "gpt2-tiny", "--hardware", "cpu", "--count", "1", "--profile", str(path),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"][0]["hardware_name"] == prof["name"]


@pytest.mark.parametrize("argv,match", [
    (["--train", "--batch", "0"], "batch"),
    (["--train", "--model", "gpt2-tinyy"], "did you mean"),
    (["--train", "--model", "gpt2-tiny", "--seq-len", "100000"], "context"),
    (["--profile", "/nonexistent.json"], "not found"),
    (["--device", "tpu"], "device"),
    (["--train", "--model", "gpt2-tiny", "--batch", "100000"], "planner predicts"),  # refused before step 1
])
def test_bench_bad_input_is_one_line(capsys, argv, match):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_bench_help(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for opt in ("--train", "--decode", "--save", "--profile", "--steps", "--threads"):
        assert opt in out


def test_the_machine_report_names_the_kernel_build_gemm_and_prefetch():
    from corelm import kernels
    from corelm.commands.bench import _kernels, render

    assert kernels.load(), kernels.load_error()
    k = _kernels()
    amx = {"amx": kernels.amx_verdict()} if kernels.amx_declared() else {}
    assert k == {"build": kernels.isa(), "panel_gemm": torch.ops.corelm.gemm(), "prefetch_bytes": kernels.prefetch(),
                 **amx}
    assert f"corelm kernels: {k['build']} build, panel GEMM {k['panel_gemm']}" in render({"kernels": k})
    no = {**k, "amx": {"ok": False, "reason": "the AMX tile check crashed (SIGSEGV)"}}
    assert "AMX tiles: off (the AMX tile check crashed (SIGSEGV))" in render({"kernels": no})
