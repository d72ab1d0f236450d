"""Sample a trained flow in either direction, from its checkpoint alone.

    python sample.py runs/demo/last.pt                    # C2I grid: a row per class
    python sample.py runs/demo/last.pt --direction i2c    # I2C on real test images: accuracy, reads, confusion
    python sample.py runs/demo/last.pt --interpolate 1 7 --num-frames 10    # C2I along m_1 -> m_7
    python sample.py runs/demo/last.pt --arithmetic "1 + 7 - 3"             # C2I of m_1 + m_7 - m_3
    python sample.py runs/demo/last.pt --trajectory --out t.gif    # z_t along the ODE, both ways (.png: a strip)
    torchrun --nproc_per_node 4 sample.py runs/demo/last.pt --num-per-class 64   # sharded, same images

C2I integrates from a class latent x_class = m_c + std_scale * eps to an image, I2C from a test image to a class
latent read off as the nearest class mean (EMA weights), on the first --num-samples test images of data.balanced_subset,
as evaluate.py; its picture frames each image green (read right) or red, beside the class read, and STEM_confusion.png
counts the reads. Every process draws all the noise from --seed and integrates its share, so the images do not depend
on the number of processes; interpolation and arithmetic strips use the noise of the plain C2I samples of the same seed.
"""
import argparse
import os
import re

import torch
from torchvision.utils import save_image

import data
import devices
from checkpoint import build_from_checkpoint, export_ema, load_checkpoint
from classifier import confusion_matrix
from devices import is_main_process, non_negative_float, number, positive_int, run_sharded
from embeddings import i2c_accuracy
from flow import DEFAULT_SOLVER, READOUT, SOLVERS, TIME_GRIDS, network_passes
from plots import PNG, plot_confusion, save_c2i_grid, save_i2c_grid, save_trajectory


def parse_class(text, class_names, num_classes):
    """A class given by id ('7') or by name ('seven', case-insensitive) -> its id."""
    text = text.strip()
    if text.isdigit():
        if int(text) >= num_classes:
            raise ValueError(f"class {text} out of range: this model has classes 0..{num_classes - 1}")
        return int(text)
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise ValueError(f"unknown class {text!r}: give an id 0..{num_classes - 1} or a name (one of: "
                     f"{', '.join(class_names)})")


def parse_class_expression(expression, class_names, num_classes):
    """'A + B - C' (ids or names) -> [(+1, a), (+1, b), (-1, c)]. Names may hold '-' or spaces
    ('T-shirt/top', 'Ankle boot'): a term is the run of digits or the longest class name where it starts."""
    names = [re.escape(name) for name in sorted(class_names, key=len, reverse=True)]
    term = re.compile(r"\s*(" + "|".join([r"\d+"] + names) + r")\s*", re.IGNORECASE)
    terms, pos, sign = [], 0, 1
    while True:
        match = term.match(expression, pos)
        if match is None:
            raise ValueError(f"cannot read a class at {expression[pos:].lstrip()!r} in --arithmetic {expression!r}; "
                             "write e.g. 'A + B - C' with class ids or names")
        terms.append((sign, parse_class(match.group(1), class_names, num_classes)))
        pos = match.end()
        if pos == len(expression):
            break
        if expression[pos] not in "+-":
            raise ValueError(f"expected '+' or '-' at {expression[pos:]!r} in --arithmetic {expression!r}")
        sign = 1 if expression[pos] == "+" else -1
        pos += 1
    if len(terms) < 2:
        raise ValueError(f"--arithmetic {expression!r} has one class; combine two or more, e.g. 'A + B - C'")
    return terms


def mixed_c2i(model, embedder, flow, classes, weights, num_rows=1, seed=0, device="cpu", sharded=False, **kw):
    """C2I of weighted class means, for each row of weights (F, k) and each of num_rows noise draws eps_r:
        z = sum_k w_k m_k + sigma * eps_r,    sigma = sum_k |w_k| sigma_k / sum_k |w_k|
    eps_r the r-th noise draw under `seed`, shared by every row of weights, sigma_k std_scale (or the learned
    std): a row with one weight 1 is a plain latent of that class. Returns (images (num_rows * F, C, H, W), nfe)."""
    means = embedder.means.detach()[classes]
    eps = torch.randn((num_rows, *means.shape[1:]), generator=torch.Generator(device).manual_seed(seed), device=device)
    stds = embedder.stds(classes).detach()
    weights = weights.to(means)
    mean = torch.einsum("fk,kchw->fchw", weights, means)
    sigma = torch.einsum("fk,kchw->fchw", weights.abs(), stds) / weights.abs().sum(1).view(-1, 1, 1, 1)
    z = (mean[None] + sigma[None] * eps[:, None]).flatten(0, 1)
    # No class ids: only standard CFG reads them, and its noise source has no means to mix.
    return run_sharded(lambda zz: flow.c2i(model, embedder, None, z=zz, **kw), z, sharded=sharded)


def interpolate(model, embedder, flow, class_a, class_b, num_frames=10, **kw):
    """C2I along the straight line z(a) = (1 - a) m_A + a m_B + sigma eps, a = 0 .. 1 in num_frames frames."""
    a = torch.linspace(0, 1, num_frames)
    return mixed_c2i(model, embedder, flow, [class_a, class_b], torch.stack([1 - a, a], dim=1), **kw)


def arithmetic(model, embedder, flow, terms, **kw):
    """C2I of each term's class and of sum_k sign_k m_k, all with the same noise: [class 1, ..., class n, result]."""
    weights = torch.cat([torch.eye(len(terms)), torch.tensor([[float(s) for s, _ in terms]])])
    return mixed_c2i(model, embedder, flow, [c for _, c in terms], weights, **kw)


def trajectories(model, embedder, flow, args, classes, num_frames=10, seed=0, device="cpu", data_dir=None,
                 sharded=False, **kw):
    """z_t along the ODE at num_frames even times: C2I from one latent per class drawn with `seed`, I2C
    from each class's first test image. Returns (c2i, i2c or None for a noise source, nfe), each (N, T, C, H, W)."""
    times = torch.linspace(0, 1, num_frames)
    y = torch.tensor(classes, device=device)
    rows_first = lambda states, nfe: (states.transpose(0, 1), nfe)  # (T, n, ...) -> (n, T, ...): shards split rows
    c2i, nfe = run_sharded(lambda zz, yy: rows_first(*flow.c2i(model, embedder, yy, z=zz, times=times, **kw)),
                           embedder(y, torch.Generator(device).manual_seed(seed)), y, sharded=sharded)
    if embedder.kind == "noise":
        return c2i, None, nfe
    test_images, test_labels = data.load_test_set(args, data_dir)
    first = torch.stack([torch.nonzero(test_labels == c)[0, 0] for c in classes])
    i2c, nfe_i2c = run_sharded(lambda xx: rows_first(*flow.i2c(model, embedder, xx, times=times, **kw)),
                               data.to_unit_range(test_images[first]).to(device), sharded=sharded)
    return c2i, i2c, max(nfe, nfe_i2c)


def main():
    p = devices.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--direction", default="c2i", choices=("c2i", "i2c"))
    p.add_argument("--classes", nargs="+", help="C2I: which classes, ids or names (default: all)")
    p.add_argument("--num-per-class", type=positive_int, default=8)
    p.add_argument("--num-samples", type=positive_int, default=1000, help="I2C: test images to score")
    p.add_argument("--solver", default=DEFAULT_SOLVER, choices=SOLVERS, help="default: %(default)s, 8 steps on 'ends'")
    p.add_argument("--steps", type=positive_int, help="default: the solver's (flow.DEFAULT_STEPS)")
    p.add_argument("--time-grid", choices=TIME_GRIDS, help="default: the solver's (flow.DEFAULT_TIME_GRID)")
    p.add_argument("--cfg-scale", type=non_negative_float, default=1.0, help="1: unguided")
    p.add_argument("--i2c-decoder", default="ode", choices=("ode", "readout"),
                   help="I2C: integrate the ODE, or one network call at t = 0 (flow.READOUT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="I2C: where the test set is (default: the training run's)")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda, cuda:N")
    p.add_argument("--out", help="output PNG (default: next to the checkpoint), or GIF for --trajectory")
    extra = p.add_mutually_exclusive_group()
    extra.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="C2I along the line from class A to B")
    extra.add_argument("--arithmetic", metavar="EXPR", help="C2I of class means such as 'A + B - C'")
    extra.add_argument("--trajectory", action="store_true", help="z_t along the ODE, both ways: a PNG strip or a GIF")
    extra.add_argument("--export", metavar="PATH", help="write the EMA weights alone in fp16 (for sampling only)")
    p.add_argument("--num-frames", type=number(int, 2, strict=False), default=10, help="--interpolate, --trajectory")
    p.add_argument("--num-rows", type=positive_int, default=1, help="--interpolate, --arithmetic: strips (noise draws)")
    args = p.parse_args()
    _, _, device = devices.setup(args.device)
    run(args, device)
    devices.shutdown()  # run_main does it on an error


def run(args, device):
    ckpt = load_checkpoint(args.checkpoint)
    if args.export:
        export_ema(ckpt, args.export)
        return print(f"wrote {args.export} (EMA weights of step {ckpt['step']} in fp16)")
    train_args = ckpt["args"]  # user mistakes are found from the args alone, before any model is built
    num_classes, class_names = train_args["num_classes"], data.CLASS_NAMES[train_args["dataset"]]
    classes = [parse_class(c, class_names, num_classes) for c in args.classes] if args.classes else None
    what = ("interpolate" if args.interpolate else "arithmetic" if args.arithmetic else
            "trajectory" if args.trajectory else args.direction)
    if what in ("i2c", "interpolate", "arithmetic") and train_args["embedding"] == "noise":
        raise ValueError(f"{args.checkpoint} is a noise-source model (--embedding noise): it has no class means to "
                         "mix and no image -> class direction; use --direction c2i")
    model, embedder, flow, train_args = build_from_checkpoint(ckpt, device)
    out = args.out or f"{os.path.splitext(args.checkpoint)[0]}_{what}.png"
    stem = os.path.splitext(out)[0]
    sharded = devices.world_size() > 1
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    kw = dict(device=device, sharded=sharded, steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale,
              time_grid=args.time_grid)
    if what == "i2c" and args.i2c_decoder == "readout":
        kw.update(READOUT)
    if sharded and (what == "i2c" or what == "trajectory" and embedder.kind != "noise"):
        # Rank 0 first: it may have to write the test set to disk, which the others then read.
        devices.when(is_main_process(), data.load_test_set, train_args, args.data_dir)

    def cost(nfe):  # guidance runs each function evaluation on a doubled batch (conditional + null)
        passes = network_passes(nfe, args.cfg_scale)
        return f"{nfe} NFE" + (f" = {passes} network passes per image" if passes != nfe else "")
    rows = dict(num_rows=args.num_rows, seed=args.seed)  # interpolation and arithmetic: the noise draws
    if what == "interpolate":
        a, b = (parse_class(c, class_names, num_classes) for c in args.interpolate)
        images, nfe = interpolate(model, embedder, flow, a, b, args.num_frames, **rows, **kw)
        message = f"wrote {out} (C2I from class {a} to {b} in {args.num_frames} frames, {cost(nfe)} each)"
    elif what == "arithmetic":
        terms = parse_class_expression(args.arithmetic, class_names, num_classes)
        images, nfe = arithmetic(model, embedder, flow, terms, **rows, **kw)
        formula = " ".join(f"{'+' if s > 0 else '-'} m_{c}" for s, c in terms).lstrip("+ ")
        message = f"wrote {out} (C2I of each class, then of {formula}; {cost(nfe)})"
    elif what == "trajectory":
        classes = classes or list(range(min(num_classes, 10)))
        c2i, i2c, nfe = trajectories(model, embedder, flow, train_args, classes, args.num_frames, args.seed,
                                     data_dir=args.data_dir, **kw)
        message = f"wrote {out} ({len(classes)} trajectories per direction, {args.num_frames} frames, {cost(nfe)})"
    elif what == "c2i":
        nfe = save_c2i_grid(model, embedder, flow, train_args, out, classes=classes, num_per_class=args.num_per_class,
                            seed=args.seed, **kw)[2]
        message = f"wrote {out} (C2I, {args.solver} {cost(nfe)}, cfg {args.cfg_scale})"
    else:
        saved = save_i2c_grid(model, embedder, flow, train_args, out, num_samples=args.num_samples,  # what I2C computes
                              num_per_class=min(args.num_per_class, 8), data_dir=args.data_dir, **kw)
        scores = i2c_accuracy(saved["pred_l2"], saved["pred_cos"], saved["labels"], num_classes)
        decoder = "t = 0 read-out" if args.i2c_decoder == "readout" else f"{kw['solver']} ODE"
        message = (f"I2C accuracy on {len(saved['labels'])} test images ({decoder}): {scores['i2c_acc_l2']:.4f} (L2), "
                   f"{scores['i2c_acc_cos']:.4f} (cosine)\nwrote {out}, {stem}_confusion.png and {stem}_latents.pt")
    if is_main_process():
        if what in ("interpolate", "arithmetic"):  # a strip per noise draw
            save_image(images, out, nrow=len(images) // args.num_rows, **PNG)
        elif what == "trajectory":
            save_trajectory(c2i, i2c, out)
        elif what == "i2c":
            torch.save({k: v.cpu() for k, v in saved.items()}, stem + "_latents.pt")
            confusion = confusion_matrix(saved["labels"], saved["pred_l2"], num_classes)
            plot_confusion(dict(kw, i2c_confusion_l2=confusion), stem + "_confusion.png")  # kw: the caption's sampler
        print(message)


if __name__ == "__main__":
    devices.run_main(main)
