"""Sample a trained flow in either direction, from its checkpoint alone.

    python sample.py runs/demo/last.pt                    # C2I grid: a row per class
    python sample.py runs/demo/last.pt --direction i2c    # I2C on real test images: accuracy + latents

C2I starts at a class latent x_class = m_c + std_scale * eps and integrates the flow to an image;
I2C starts at a real image and integrates to a class latent, read off as the nearest class mean
(by L2 and by cosine). Models trained one way (l2i or i2l) run the other way by integrating
t from 1 back to 0 (flow.py). Uses the EMA weights.
"""
import argparse
import os
import sys

import torch
from torchvision.utils import save_image

import data
from checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from flow import SOLVERS


def to_pixels(x):
    """[-1, 1] -> [0, 1] for PNGs; class latents carry noise beyond +-1, so clamp for display."""
    return (x.float().clamp(-1, 1) + 1) / 2


@torch.no_grad()
def save_c2i_grid(model, embedder, flow, args, path, device="cpu", classes=None, num_per_class=8,
                  steps=40, solver="euler", cfg_scale=1.0, seed=0):
    """Generate num_per_class images for each class; one row per class. Returns (images, labels, nfe)."""
    classes = list(range(args["num_classes"])) if classes is None else classes
    y = torch.tensor(classes, device=device).repeat_interleave(num_per_class)
    generator = torch.Generator(device).manual_seed(seed)
    images, nfe = flow.c2i(model, embedder, y, generator=generator, steps=steps, solver=solver, cfg_scale=cfg_scale)
    save_image(to_pixels(images), path, nrow=num_per_class, padding=1)
    return images, y, nfe


@torch.no_grad()
def save_i2c_grid(model, embedder, flow, args, path, device="cpu", num_per_class=4, steps=40, solver="euler",
                  cfg_scale=1.0, num_images=None, data_dir=None):
    """I2C on real test images: a row per class of (image, generated class latent) pairs.

    Returns (accuracy_l2, accuracy_cos, latents, labels) over num_images test images (default: the
    grid's images only)."""
    test_images, test_labels = data.load_dataset(args["dataset"], "test", data_dir or args["data_dir"],
                                                 args["image_size"])
    # The first num_per_class test images of every class, then more in test-set order.
    picked = torch.cat([torch.nonzero(test_labels == c)[:num_per_class, 0] for c in range(args["num_classes"])])
    if num_images is not None:
        rest = torch.ones(len(test_labels), dtype=torch.bool)
        rest[picked] = False
        picked = torch.cat([picked, torch.nonzero(rest)[:max(0, num_images - len(picked)), 0]])
    x_image = data.to_unit_range(test_images[picked]).to(device)
    labels = test_labels[picked].to(device)
    latents = torch.cat([flow.i2c(model, embedder, chunk, steps=steps, solver=solver, cfg_scale=cfg_scale)[0]
                         for chunk in x_image.split(500)])
    pred_l2, pred_cos = embedder.decode(latents)
    n_grid = num_per_class * args["num_classes"]
    pairs = torch.stack([x_image[:n_grid], latents[:n_grid].to(x_image.dtype)], dim=1).flatten(0, 1)
    save_image(to_pixels(pairs), path, nrow=2 * num_per_class, padding=1)
    return ((pred_l2 == labels).float().mean().item(), (pred_cos == labels).float().mean().item(),
            latents, labels)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--direction", default="c2i", choices=("c2i", "i2c"))
    p.add_argument("--classes", type=int, nargs="+", help="C2I: which classes (default: all)")
    p.add_argument("--num-per-class", type=int, default=8)
    p.add_argument("--num-images", type=int, default=1000, help="I2C: test images to score")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--solver", default="euler", choices=SOLVERS)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="I2C: where the test set is (default: the training run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output PNG (default: next to the checkpoint)")
    args = p.parse_args()
    if args.steps <= 0 or args.num_per_class <= 0:
        p.error("--steps and --num-per-class must be positive")

    ckpt = load_checkpoint(args.checkpoint)
    model, embedder, flow, train_args = build_from_checkpoint(ckpt, args.device)
    bad = [c for c in args.classes or [] if not 0 <= c < train_args["num_classes"]]
    if bad:
        p.error(f"--classes {bad} out of range: this model has classes 0..{train_args['num_classes'] - 1}")
    stem = os.path.splitext(args.checkpoint)[0]
    out = args.out or f"{stem}_{args.direction}.png"
    if args.direction == "c2i":
        _, _, nfe = save_c2i_grid(model, embedder, flow, train_args, out, args.device, args.classes,
                                  args.num_per_class, args.steps, args.solver, args.cfg_scale, args.seed)
        print(f"wrote {out} (C2I, {args.solver} {nfe} NFE, cfg {args.cfg_scale})")
    else:
        acc_l2, acc_cos, latents, labels = save_i2c_grid(
            model, embedder, flow, train_args, out, args.device, min(args.num_per_class, 8), args.steps,
            args.solver, args.cfg_scale, args.num_images, args.data_dir)
        latents_path = os.path.splitext(out)[0] + "_latents.pt"
        pred_l2, pred_cos = embedder.decode(latents)
        torch.save(dict(latents=latents.cpu(), labels=labels.cpu(), pred_l2=pred_l2.cpu(),
                        pred_cos=pred_cos.cpu()), latents_path)
        print(f"I2C accuracy on {len(labels)} test images: {acc_l2:.4f} (L2), {acc_cos:.4f} (cosine)")
        print(f"wrote {out} (image | latent pairs) and {latents_path}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
