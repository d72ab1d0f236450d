"""Tests for bench.py and the speed work: non-uniform time grids against analytic ODEs, the foreach
EMA update, FLOP counting, and a `bench.py --quick` run that must report every field.
Run: .venv/bin/python -m pytest -q _tests_bench.py"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import data
import train
from flow import SOLVERS, TIME_GRIDS, Flow, fixed_time_grid

torch.set_num_threads(1)  # a shared 2-core CPU: a second thread only spins against other processes
HERE = os.path.dirname(os.path.abspath(__file__))


class Field(torch.nn.Module):
    """A 'model' whose velocity is a known function f(z, t), for checking the integrators exactly."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, z, t, cond, direction=None):
        return self.f(z, t.view(-1, 1, 1, 1).to(torch.float64)).to(z.dtype)


def integrate(f, solver, steps, grid, z0=1.0, reverse=False):
    z = torch.full((1, 1, 1, 1), z0)
    return Flow("l2i").integrate(Field(f), z, 0, solver=solver, steps=steps, time_grid=grid, reverse=reverse)


@pytest.mark.parametrize("kind", TIME_GRIDS)
def test_time_grids_run_exactly_from_0_to_1_and_increase(kind):
    s = fixed_time_grid(8, kind)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0 and len(s) == 9
    assert (s.diff() > 0).all()


def test_end_grid_shrinks_its_steps_towards_the_end_and_start_grid_is_its_mirror():
    end, start, ends = (fixed_time_grid(8, k).double() for k in ("end", "start", "ends"))
    assert (end.diff().diff() < 0).all()
    torch.testing.assert_close(start.diff(), end.diff().flip(0))
    torch.testing.assert_close(ends.diff(), ends.diff().flip(0))  # symmetric: small at both ends
    assert ends.diff()[0] < 1 / 8 < ends.diff()[4]


@pytest.mark.parametrize("kind", TIME_GRIDS)
def test_euler_on_a_grid_is_the_left_riemann_sum_and_midpoint_is_exact_for_linear_velocity(kind):
    # dz/dt = 2t: z(1) = z(0) + 1. Euler gives z(0) + sum_i 2 t_i h_i on the grid's own t_i and h_i.
    t = fixed_time_grid(5, kind).double()
    z_euler, nfe = integrate(lambda z, t: 2 * t.expand_as(z), "euler", 5, kind)
    assert nfe == 5
    assert z_euler.item() == pytest.approx(1 + (2 * t[:-1] * t.diff()).sum().item(), abs=1e-6)
    z_mid, nfe = integrate(lambda z, t: 2 * t.expand_as(z), "midpoint", 5, kind)
    assert nfe == 10 and z_mid.item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("kind", TIME_GRIDS)
def test_reverse_integration_walks_the_same_grid_backwards(kind):
    # dz/dt = 2t from t=1 to 0: z(0) = z(1) - 1. Euler's left points are now the grid's upper ends.
    t = 1 - fixed_time_grid(5, kind).double()  # progress from the start, t from 1 down to 0
    z, _ = integrate(lambda z, t: 2 * t.expand_as(z), "euler", 5, kind, reverse=True)
    assert z.item() == pytest.approx(1 + (2 * t[:-1] * t.diff()).sum().item(), abs=1e-6)


@pytest.mark.parametrize("kind", TIME_GRIDS)
def test_fixed_step_solvers_converge_at_their_order_on_every_grid(kind):
    # dz/dt = cos(t) z: z(1) = exp(sin 1). Refining the grid h -> h/2 (euler) or h/4 (midpoint) divides
    # the error by about 2 or 16; at 16 NFE each, rk4 4 beats midpoint 8 tenfold, which beats euler 16.
    exact = math.exp(math.sin(1.0))

    def error(solver, steps):
        return abs(integrate(lambda z, t: torch.cos(t) * z, solver, steps, kind)[0].item() - exact)
    assert error("euler", 16) / error("euler", 32) == pytest.approx(2, rel=0.15)
    assert 10 < error("midpoint", 8) / error("midpoint", 32) < 20
    assert error("rk4", 4) < error("midpoint", 8) / 10 and error("midpoint", 8) < error("euler", 16) / 3


def test_unknown_time_grid_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="uniform"):
        fixed_time_grid(4, "log")


def test_foreach_ema_update_equals_one_lerp_per_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ema, reference = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
        train.update_ema(ema, model, 0.9)
        for ref_p, p in zip(reference.parameters(), model.parameters()):
            ref_p.lerp_(p, 0.1)
    torch.testing.assert_close(list(ema.parameters()), list(reference.parameters()), rtol=0, atol=0)
    torch.testing.assert_close(ema[1].running_mean, model[1].running_mean)  # buffers are copied


def test_step_flops_counted_at_batch_2_scale_exactly_to_the_batch():
    _, parts = bench.build_training("tiny", "dit", 4, torch.device("cpu"), False, False, False)
    x_uint8 = torch.zeros(4, *parts["args"].data_shape, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _, _ = parts["flow"].loss(parts["model"], data.to_unit_range(x_uint8),
                                        torch.zeros(4, dtype=torch.long), parts["embedder"])
        loss.backward()
    assert bench.count_step_flops(parts, torch.device("cpu"), 4) == counter.get_total_flops() > 0


def test_bench_quick_runs_and_reports_every_field(tmp_path):
    # ~30 s on the shared CPU. Speeds are measured, never asserted: only that each field is there.
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out)], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["matmul_tflops"]) == {"bf16", "fp32"} and all(v > 0 for v in report["matmul_tflops"].values())
    assert {(r["model"], r["channels_last"]) for r in report["training"]} == {
        ("dit", False), ("unet", True), ("unet", False)}
    for row in report["training"]:
        for key in ("img_per_s", "step_ms", "gflop_per_step", "mfu", "peak_mem_mb"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["batch_size"] == 4 and not row["compile"]
    assert [r["solver"] for r in report["sampling"]] == list(SOLVERS)
    assert all(r["nfe"] > 0 and r["seconds_per_batch"] > 0 for r in report["sampling"])
    assert [r["nfe"] for r in report["sampling"][:3]] == [40, 16, 16]
    assert report["inception"]["img_per_s"] > 0
    assert "MFU" in result.stdout and "img/s" in result.stdout
