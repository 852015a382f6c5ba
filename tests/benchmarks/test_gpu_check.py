"""benchmarks/gpu_check.py on CPU (--dry-run-cpu): the script a GPU host runs keeps working.

The CUDA parts themselves need a GPU; this runs the same training step (bf16 autocast, on CPU)
and the same Scorer comparison (the CPU provider on both sides) end to end on MiniLM-L6."""

from __future__ import annotations

import math

import pytest

from tests.benchmarks import run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_gpu_check_dry_run_on_cpu_reports_its_figures():
    out, _ = run_benchmark("gpu_check.py", "--dry-run-cpu", timeout=900)
    assert out["dry_run_cpu"] is True and out["gpu"] is None
    assert out["train_losses_finite"] is True
    assert out["train_bf16_ms_per_step_b32s64"] > 0
    assert 0 <= out["bf16_vs_fp32_loss_diff"] < 0.1  # bf16 autocast moves the loss a little
    assert out["ort_cuda_provider"] is False  # the CPU provider stood in for CUDA
    assert out["ort_cuda_vs_cpu_max_abs_score_diff"] == 0.0  # the same provider twice
    for key in ("ort_cuda_ms_b1", "ort_cuda_ms_b64", "ort_cpu_ms_b1", "ort_cpu_ms_b64"):
        assert math.isfinite(out[key]) and out[key] > 0, key
