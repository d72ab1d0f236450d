"""Tests for class latents from text (clip/text/learned) and the sampling extras of sample.py:
interpolation, latent arithmetic, ODE trajectories and multi-process sampling.

Run: .venv/bin/python -m pytest -q _tests_extras.py
"""
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
from PIL import Image

import class_vectors
import data
import sample
from checkpoint import build_from_checkpoint, load_checkpoint
from embeddings import (ClassEmbedder, build_embedder, load_class_vectors, projected_means,
                        rectangle_means)

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1")
STEPS = dict(steps=3, solver="euler", cfg_scale=1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A micro bidi DiT trained 3 steps on MNIST with learned class latents: untrained, but every
    property tested here (determinism, matching end frames, sharding) holds for any weights."""
    root = tmp_path_factory.mktemp("extras")
    out, data_dir = root / "run", root / "data"
    cmd = [PYTHON, "train.py", "--dataset", "mnist", "--mode", "bidi", "--model", "dit", "--preset", "tiny",
           "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "8", "--batch-size", "8",
           "--max-steps", "3", "--embedding", "learned", "--lr", "1e-2", "--warmup-steps", "0",
           "--sample-steps", "2", "--data-dir", str(data_dir), "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ckpt_path = str(out / "last.pt")
    ckpt = load_checkpoint(ckpt_path)
    model, embedder, flow, args = build_from_checkpoint(ckpt)
    return dict(path=ckpt_path, ckpt=ckpt, model=model, embedder=embedder, flow=flow, args=args, root=root)


# ---------------------------------------------------------------- class latents

def test_text_projection_preserves_pairwise_distances_up_to_the_pixel_scale():
    vectors = torch.randn(10, 512, generator=torch.Generator().manual_seed(0))
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    for shape in [(1, 32, 32), (3, 32, 32)]:
        means = projected_means(vectors, shape, seed=3).flatten(1)
        scale = math.sqrt(math.prod(shape))
        assert torch.allclose(torch.cdist(means, means), scale * torch.cdist(unit, unit), atol=1e-3)
        assert torch.allclose(means.pow(2).mean(dim=1), torch.ones(10), atol=1e-4)  # pixel RMS 1


@pytest.mark.parametrize("kind", ["rectangle", "grayscale", "smoothrand", "text", "clip", "learned"])
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32)])
def test_every_kind_decodes_its_own_noisy_samples_to_their_class(kind, shape):
    extra = {"text": dict(dataset="mnist"),  # the shipped MiniLM vectors of the digit names
             "clip": dict(vectors=torch.randn(10, 512, generator=torch.Generator().manual_seed(1)))}
    embedder = build_embedder(kind, 10, shape, std_scale=1.0, **extra.get(kind, {}))
    y = torch.arange(10).repeat(30)
    pred_l2, pred_cos = embedder.decode(embedder(y, torch.Generator().manual_seed(0)))
    assert (pred_l2 == y).float().mean() > 0.9  # chance: 0.1
    if kind != "grayscale":  # grayscale means are parallel: only their length tells them apart
        assert (pred_cos == y).float().mean() > 0.9


def test_shipped_text_vectors_are_unit_rows_named_like_the_datasets_classes():
    for dataset in data.DATASETS:
        vectors, names = load_class_vectors("text", dataset)
        assert vectors.dtype == torch.float32 and vectors.shape == (data.num_classes(dataset), 384)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)
        if dataset != "imagenet100":  # its names are filled in only when the dataset is loaded
            assert names == data.CLASS_NAMES[dataset]
    names = load_class_vectors("text", "imagenet100")[1]
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
        shipped = torch.load(os.path.join(REPO, "class_vectors", f"text_{dataset}.pt"), weights_only=True)
        fresh = class_vectors.compute("text", class_vectors.dataset_class_names(dataset))
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


def test_learned_class_means_move_during_training(run):
    start = rectangle_means(10, (1, 32, 32))
    trained = run["ckpt"]["embedder"]
    assert (trained["means"] - start).abs().max() > 1e-3  # 3 Adam steps at lr 1e-2
    assert trained["logvar"].shape == start.shape


# ---------------------------------------------------------------- interpolation and arithmetic

def test_mixed_latents_follow_the_straight_line_with_shared_noise():
    embedder = build_embedder("rectangle", 10, (1, 32, 32), std_scale=0.5)
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([0.0, 0.25, 1.0])
    z = sample.mixed_latents(embedder, torch.tensor([1, 7]), torch.stack([1 - a, a], 1), eps).view(2, 3, 1, 32, 32)
    m1, m7 = embedder.means[1], embedder.means[7]
    for r in range(2):
        for f in range(3):
            assert torch.allclose(z[r, f], (1 - a[f]) * m1 + a[f] * m7 + 0.5 * eps[r], atol=1e-6)


def test_interpolation_end_frames_are_the_plain_c2i_samples_of_both_classes(run, tmp_path):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    images, _ = sample.interpolate(m, e, flow, 1, 7, num_steps=5, num_rows=2, seed=3, **STEPS)
    assert images.shape == (2 * 5, 1, 32, 32)
    strips = images.view(2, 5, 1, 32, 32)
    plain_1 = sample.save_c2i_grid(m, e, flow, args, tmp_path / "a.png", classes=[1], num_per_class=2, seed=3,
                                   **STEPS)[0]
    plain_7 = sample.save_c2i_grid(m, e, flow, args, tmp_path / "b.png", classes=[7], num_per_class=2, seed=3,
                                   **STEPS)[0]
    assert torch.allclose(strips[:, 0], plain_1, atol=1e-5)
    assert torch.allclose(strips[:, -1], plain_7, atol=1e-5)
    assert not torch.allclose(strips[:, 2], plain_1, atol=1e-3)


def test_interpolation_and_arithmetic_are_deterministic_under_a_seed(run):
    m, e, flow = run["model"], run["embedder"], run["flow"]
    first = sample.interpolate(m, e, flow, 0, 9, num_steps=4, seed=5, **STEPS)[0]
    assert torch.equal(first, sample.interpolate(m, e, flow, 0, 9, num_steps=4, seed=5, **STEPS)[0])
    assert not torch.allclose(first, sample.interpolate(m, e, flow, 0, 9, num_steps=4, seed=6, **STEPS)[0])
    terms = [(1, 1), (1, 7), (-1, 3)]
    first = sample.arithmetic(m, e, flow, terms, num_rows=2, seed=5, **STEPS)[0]
    assert first.shape == (2 * 4, 1, 32, 32)
    assert torch.equal(first, sample.arithmetic(m, e, flow, terms, num_rows=2, seed=5, **STEPS)[0])


def test_arithmetic_strip_is_each_class_then_the_sum_of_means_with_the_same_noise(run, tmp_path):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    images, _ = sample.arithmetic(m, e, flow, [(1, 1), (1, 7), (-1, 3)], num_rows=1, seed=2, **STEPS)
    plain = sample.save_c2i_grid(m, e, flow, args, tmp_path / "p.png", classes=[1, 7, 3], num_per_class=1,
                                 seed=0, **STEPS)[0]
    eps = sample.class_noise(e, 1, 2, "cpu")
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


def test_bad_arithmetic_expression_is_one_error_line_and_exit_2(run, monkeypatch, capsys):
    # The script as `python sample.py ...` runs it, in this process (a fresh interpreter costs seconds).
    monkeypatch.setattr(sys, "argv", ["sample.py", run["path"], "--arithmetic", "one + kangaroo"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "sample.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot read a class at 'kangaroo' in --arithmetic 'one + kangaroo'; "
        "write e.g. 'A + B - C' with class ids or names"]


# ---------------------------------------------------------------- trajectories

def test_trajectories_run_from_the_sources_to_the_plain_samples_both_ways(run, tmp_path):
    m, e, flow, args = run["model"], run["embedder"], run["flow"], run["args"]
    c2i, i2c, _ = sample.trajectories(m, e, flow, args, [0, 4, 9], num_steps=4, seed=1, **STEPS)
    assert c2i.shape == i2c.shape == (3, 4, 1, 32, 32)
    latents = e(torch.tensor([0, 4, 9]), torch.Generator().manual_seed(1))
    assert torch.allclose(c2i[:, 0], latents)
    plain = sample.save_c2i_grid(m, e, flow, args, tmp_path / "c.png", classes=[0, 4, 9], num_per_class=1,
                                 seed=1, **STEPS)[0]
    assert torch.allclose(c2i[:, -1], plain, atol=1e-5)
    images, labels = data.load_dataset("mnist", "test", args["data_dir"])
    first = [int(torch.nonzero(labels == c)[0, 0]) for c in (0, 4, 9)]
    x_image = data.to_unit_range(images[first])
    assert torch.equal(i2c[:, 0], x_image)
    assert torch.allclose(i2c[:, -1], flow.i2c(m, e, x_image, **STEPS)[0], atol=1e-5)
    again = sample.trajectories(m, e, flow, args, [0, 4, 9], num_steps=4, seed=1, **STEPS)
    assert torch.equal(again[0], c2i) and torch.equal(again[1], i2c)

    sample.save_trajectory(c2i, i2c, tmp_path / "t.png", tmp_path / "t.gif")
    assert Image.open(tmp_path / "t.png").size == (4 * 33 + 1, 6 * 33 + 1)  # 4 frames x (3 C2I + 3 I2C) rows
    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (2 * (3 * 33 + 1), 2 * (2 * 33 + 1))


def test_trajectories_of_one_way_models_also_run_from_source_to_target(run):
    """An l2i model reaches I2C by integrating t from 1 back to 0; its frames still start at the image.
    A constant velocity v = 1 makes every state known in closed form: z_t = z_0 + t."""
    from flow import Flow
    unit_velocity = lambda x, t, cond, direction=None: torch.ones_like(x)
    e, args = run["embedder"], run["args"]
    c2i, i2c, _ = sample.trajectories(unit_velocity, e, Flow("l2i"), args, [2, 5], num_steps=3, seed=0, **STEPS)
    latents = e(torch.tensor([2, 5]), torch.Generator().manual_seed(0))
    assert torch.allclose(c2i, latents[:, None] + torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1), atol=1e-6)
    x_image = i2c[:, 0]
    assert x_image.min() >= -1 and x_image.max() <= 1  # a real image, not a latent
    assert torch.allclose(i2c, x_image[:, None] - torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1), atol=1e-6)


# ---------------------------------------------------------------- several processes

def test_two_processes_give_the_same_c2i_samples_as_one(run, tmp_path):
    torchrun = os.path.join(os.path.dirname(PYTHON), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "sample.py", run["path"], "--num-per-class", "3", "--steps", "3", "--seed", "4", "--save-tensors", "--device", "cpu",
           "--out", str(tmp_path / "c2i.png")]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote") == 2  # rank 0 only: the PNG and the tensors
    sharded = torch.load(tmp_path / "c2i.pt", weights_only=True)
    single, labels, _ = sample.save_c2i_grid(run["model"], run["embedder"], run["flow"], run["args"],
                                             tmp_path / "single.png", num_per_class=3, seed=4, **STEPS)
    assert sharded["images"].shape == (30, 1, 32, 32)
    assert torch.equal(sharded["labels"], labels)
    assert torch.allclose(sharded["images"], single, atol=1e-5)


def test_run_sharded_splits_and_gathers_rows_in_order_for_any_world_size(monkeypatch):
    """The sharding arithmetic, with all_gather played by hand: 7 rows over 3 and 8 processes."""
    rows = torch.arange(7.0).view(7, 1) * 10
    for world in (3, 8):
        outputs = []
        for rank in range(world):
            monkeypatch.setattr(sample.dist, "is_initialized", lambda: True)
            monkeypatch.setattr(sample.dist, "get_world_size", lambda: world)
            monkeypatch.setattr(sample.dist, "get_rank", lambda: rank)
            monkeypatch.setattr(sample.dist, "all_gather", lambda pieces, out: outputs.append(out) or
                                [p.copy_(out) for p in pieces])
            monkeypatch.setattr(sample.dist, "all_reduce", lambda t, op=None: None)
            sample.run_sharded(lambda x: (x + 1, 2), rows, sharded=True)
        assert torch.equal(torch.cat(outputs)[:7], rows + 1)
