"""Train a flow between class latents and images.

    python train.py --dataset mnist --mode bidi --model unet --preset tiny --out runs/demo   # one process
    torchrun --nproc_per_node 8 train.py --dataset cifar --mode bidi                         # DDP, 8 GPUs

Defaults are the reference settings (TRAIN_PRESETS, REFERENCE); `--preset tiny` learns MNIST in minutes on a CPU.
--out holds last.pt (+ kept snapshots), log.jsonl and PNG grids. SIGTERM saves and exits, a non-finite loss or
weight stops the run before anything poisoned is written, and --resume continues bit for bit (checkpoint.py).
"""
import argparse
import json
import os
import random
import signal
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import devices
from checkpoint import (MODELS, build_class_embedder, build_flow, build_training_state, check_out_dir,
                        newest_good_checkpoint, resume_run, rng_state, save_checkpoint, set_rng_state)
from devices import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from embeddings import KINDS
from flow import DEFAULT_SOLVER, MODES, SOLVERS
from metrics import evaluate_checkpoint_model
from model_dit import DIT_PRESETS
from model_unet import UNET_PRESETS, reference_attention
from plots import save_c2i_grid, save_i2c_grid

# Training recipes by preset; command-line flags win. 'tiny' is the CPU recipe (RESULTS.md). Its second line
# lets both directions learn within the demo budget: image->class samples train at the image end (t = u^50),
# where the class must be read, and so need fewer of them (30% of the batch, the rest learns to draw); they end at
# half the latent noise (std 0.5) while class->image starts from std 1, a wider source to draw varied digits from.
TRAIN_PRESETS = {
    "tiny": dict(lr=1e-3, batch_size=64, max_steps=1000, warmup_steps=100, ema_decay=0.999, ema_warmup=True,
                 grad_clip=1.0,
                 embedding="text", std_scale=1.0, i2c_noise_scale=0.5, i2c_time_power=50.0, lambda_b=0.3),
    "mnist": dict(max_steps=120_000), "cifar": dict(max_steps=300_000), "imagenet": dict(max_steps=400_000),
}
REFERENCE = dict(embedding="rectangle", std_scale=1.0, lambda_b=0.5, i2c_time_power=1.0, i2c_noise_scale=1.0, lr=1e-4,
                 batch_size=256, max_steps=300_000, warmup_steps=0, ema_decay=0.9999, ema_warmup=False, grad_clip=0.0)
DEFAULT_PRESET = {"mnist": "mnist", "fashion": "mnist", "cifar": "cifar", "imagenet100": "imagenet"}
MODEL_FLAGS = {"dit": ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio"),
               "unet": ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                        "dropout", "num_heads")}
T_BUCKETS = 4  # the log splits each direction's loss over t in [0, 1/4), [1/4, 1/2), ...


def get_args(argv=None):
    p = devices.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar", choices=sorted(DEFAULT_PRESET))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    p.add_argument("--mode", default="l2i", choices=MODES)
    p.add_argument("--model", default="dit", choices=MODELS)
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="default: the dataset's reference preset")
    # Model shape: each default is the preset's (model_dit.DIT_PRESETS, model_unet.UNET_PRESETS).
    p.add_argument("--patch-size", type=int, help="DiT: patch side")
    p.add_argument("--hidden-size", type=int, help="DiT: width")
    p.add_argument("--depth", type=int, help="DiT: blocks")
    p.add_argument("--num-heads", type=int, help="attention heads, DiT and UNet")
    p.add_argument("--mlp-ratio", type=float, help="DiT: MLP width over hidden size")
    p.add_argument("--model-channels", type=int, help="UNet: channels at full resolution")
    p.add_argument("--channel-mult", type=int, nargs="+", help="UNet: channel multiplier per resolution")
    p.add_argument("--num-res-blocks", type=int, help="UNet: residual blocks per resolution")
    p.add_argument("--attention-resolutions", type=int, nargs="*", help="UNet: feature-map sides that attend")
    p.add_argument("--dropout", type=float, help="UNet: dropout in the residual blocks")
    p.add_argument("--unet-attention", default="resolutions", choices=("resolutions", "reference"),
                   help="UNet: attend at the feature-map sides given, or where the reference does (model_unet.py)")
    p.add_argument("--embedding", choices=KINDS, help="default: the preset's (rectangle for the reference)")
    p.add_argument("--std-scale", type=non_negative_float, help="class latents' noise std (default: preset's)")
    p.add_argument("--rect-size", type=int, default=10, help="rectangle latents: the side in pixels")
    p.add_argument("--blur-sigma", type=float, default=2.0)
    p.add_argument("--low-res", type=int, default=6, help="smoothrand noise resolution")
    p.add_argument("--embedding-seed", type=int, default=0)
    p.add_argument("--kl-weight", type=non_negative_float, default=1e-3, help="KL weight of the 'learned' latents")
    p.add_argument("--sep-weight", type=non_negative_float, default=100.0, help="'learned': weight of the means' hinge")
    p.add_argument("--lambda-b", type=fraction, help="bidi: share of image->class samples (default: the preset's)")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ln", action="store_true", help="logit-normal t")
    p.add_argument("--ln-loc", type=float, default=0.0)
    p.add_argument("--ln-scale", type=float, default=1.0)
    p.add_argument("--si-scale", type=non_negative_float, default=0.0)
    p.add_argument("--i2c-time-power", type=positive_float, help="image->class t^p (flow.py; default: preset's)")
    p.add_argument("--i2c-noise-scale", type=non_negative_float, help="image->class: noise x r (default: preset's)")
    p.add_argument("--use-conditioning", action="store_true", help="standard class CFG (noise source only)")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--batch-size", type=positive_int, help="global batch, split over processes")
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--warmup-steps", type=non_negative_int)
    p.add_argument("--ema-decay", type=fraction)
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction,
                   help="EMA decay min(decay, (1+step)/(10+step)) so a short run's EMA is not its init")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--grad-clip", type=non_negative_float, help="max gradient norm, 0: off (default: the preset's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: where it is fast)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--ckpt-every", type=positive_int, default=5000)
    p.add_argument("--keep-every", type=positive_int, default=50_000, help="also keep step_N.pt every N steps")
    p.add_argument("--sample-every", type=positive_int, default=5000)
    p.add_argument("--sample-steps", type=positive_int, help="default: the solver's (flow.DEFAULT_STEPS)")
    p.add_argument("--sample-solver", default=DEFAULT_SOLVER, choices=SOLVERS)
    p.add_argument("--eval-every", type=non_negative_int, default=0, help="FID, P/R, accuracies every N steps")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="images (and test images) per evaluation")
    args = apply_preset(p.parse_args(argv))
    check_args(args)
    return args


def apply_preset(args):
    """The one step that fills in what the command line left out (None): the preset's value, else the reference's.
    A --embedding noise source is N(0, I) by definition: its std is 1, and any other --std-scale is refused."""
    args.preset = args.preset or DEFAULT_PRESET[args.dataset]
    if args.embedding == "noise":
        if args.std_scale not in (None, 1.0):
            raise ValueError(f"--embedding noise draws from N(0, I): --std-scale {args.std_scale} does not apply")
        args.std_scale = 1.0
    for key, value in {**REFERENCE, **TRAIN_PRESETS[args.preset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_config = dict((DIT_PRESETS if args.model == "dit" else UNET_PRESETS)[args.preset])
    if args.model == "unet" and args.unet_attention == "reference":
        args.model_config.update(reference_attention(args.image_size))
    for key in MODEL_FLAGS[args.model]:
        if (value := getattr(args, key)) is not None:
            args.model_config[key] = tuple(value) if isinstance(value, list) else value
    args.data_shape = data.dataset_shape(args.dataset, args.image_size)
    args.num_classes = data.num_classes(args.dataset)
    return args


def check_args(args):
    """What the flags' types (devices.number) cannot check, before any work: a ValueError is run_main's one line."""
    if args.use_conditioning != (args.embedding == "noise"):  # the class reaches the model one way, exactly
        raise ValueError("--use-conditioning is standard class CFG for a noise source, and a noise source needs it: "
                         "a class latent carries the class, plain noise does not (use --embedding noise with "
                         "--use-conditioning, or neither)")
    if args.embedding == "noise" and args.mode != "l2i":
        raise ValueError("--embedding noise has no class to read back: use --mode l2i")
    # step_N.pt is linked at a save only: off the --ckpt-every grid a snapshot the run reaches is never written.
    if args.keep_every % args.ckpt_every and args.keep_every <= args.max_steps:
        raise ValueError(f"--keep-every {args.keep_every} is not a multiple of --ckpt-every {args.ckpt_every}")
    # Checked before the process group exists: every rank fails alike, and none dies mid-handshake.
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    build_flow(vars(args))  # the constructors check the flow's and the class latents' flags
    build_class_embedder(vars(args))


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params = list(ema.parameters())
    if ema_params:  # one multi-tensor kernel, not one launch per parameter (~100 for a DiT)
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def ema_decay_at(step, args):
    return min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay


def lr_at(step, args):
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def train_step(train_model, embedder, flow, optimizer, params, x_uint8, y, generator, autocast, args):
    """One optimisation step on a uint8 batch (bench.py times exactly this). Returns (total loss, per-sample
    loss, the flow's batch), left on the device: nothing here waits for the GPU."""
    x_image = data.to_unit_range(x_uint8)
    if args.dataset in data.FLIP_DATASETS:
        x_image = data.random_hflip(x_image, generator)
    with autocast:
        loss, per_sample, batch = flow.loss(train_model, x_image, y, embedder, generator)
        total = loss + args.kl_weight * embedder.kl_loss() + args.sep_weight * embedder.separation_loss()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    for p in embedder.parameters():  # learned class latents live outside DDP: average their gradients here
        devices.all_reduce(p.grad, "mean")
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    return total, per_sample, batch


class Progress:
    """Loss sums and counts by direction (c2i, i2c) and quarter of t, and the first step with a non-finite
    loss, kept on the device: the loop waits for the GPU only when it logs or checks."""

    def __init__(self, args, step, device):
        self.args, self.saved_step = args, step
        self.sums_counts = torch.zeros(2, 2, T_BUCKETS, device=device)  # (sum | count, direction, t bucket)
        self.first_bad_step = torch.tensor(-1, device=device)
        self.time, self.step = time.time(), step

    def add(self, step, total, per_sample, batch):
        cell = batch["direction"] * T_BUCKETS + (batch["t"] * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
        per_sample = per_sample.detach().float()
        self.sums_counts.view(2, -1).index_add_(1, cell, torch.stack([per_sample, torch.ones_like(per_sample)]))
        self.mark_bad(step, torch.isfinite(total.detach()))

    def mark_bad(self, step, finite):  # keeps the first step at which `finite` was False
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step)

    def check_finite(self, step, params=None):
        """Raise if any rank saw a non-finite loss; with params (before a save) check the weights too: an inf
        gradient can follow a finite loss. So no checkpoint is ever poisoned."""
        if params is not None:
            self.mark_bad(step, torch.stack([p.isfinite().all() for p in params]).all())
        first_bad = devices.all_reduce(self.first_bad_step, "max").item()
        if first_bad >= 0:
            kept = f"last.pt keeps step {self.saved_step}" if self.saved_step else "no checkpoint was written"
            raise FloatingPointError(f"loss or weights became non-finite at step {first_bad}; "
                                     f"stopped without saving, {kept} (try a lower --lr)")

    def log(self, step, extra):
        """The record since the last one (every rank's losses, and `extra`): rank 0 logs it and prints a line."""
        sums, counts = devices.all_reduce(self.sums_counts).tolist()
        self.sums_counts.zero_()
        now, args = time.time(), self.args
        img_per_s = (step - self.step) * args.batch_size / (now - self.time)
        self.time, self.step = now, step
        record = dict(step=step, loss=sum(map(sum, sums)) / sum(map(sum, counts)), lr=lr_at(step - 1, args),
                      img_per_s=img_per_s, **extra)
        for name, by_t, n_by_t in zip(("c2i", "i2c"), sums, counts):
            if sum(n_by_t):
                record[f"loss_{name}"] = sum(by_t) / sum(n_by_t)
                record[f"loss_{name}_by_t"] = [s / n if n else None for s, n in zip(by_t, n_by_t)]
        if devices.is_main_process():
            eta = (args.max_steps - step) * args.batch_size / max(img_per_s, 1e-9)
            parts = " ".join(f"{k[5:]} {record[k]:.4f}" for k in ("loss_c2i", "loss_i2c") if k in record)
            print(f"step {step}/{args.max_steps} | loss {record['loss']:.4f} {parts} | {img_per_s:.0f} img/s | "
                  f"ETA {eta / 60:.1f} min", flush=True)
            write_line(args.out, record)


def save(step, args, stateful, generator):
    """Rank 0 writes the state of the run to --out/last.pt, with every rank's random streams (for an exact
    resume), and every --keep-every steps links it as step_N.pt (a hard link: no second copy on disk)."""
    rngs = devices.all_gather_object(rng_state(generator))
    if devices.is_main_process():
        last_pt, snapshot = os.path.join(args.out, "last.pt"), os.path.join(args.out, f"step_{step}.pt")
        state = {key: obj.state_dict() for key, obj in stateful.items()}
        save_checkpoint(dict(state, args=vars(args), step=step, rng=rngs), last_pt)
        if step % args.keep_every == 0 and not os.path.exists(snapshot):
            os.link(last_pt, snapshot)


def restore(ckpt, stateful, generator, world_size, rank):
    """Load the saved state into the run (popped: the run keeps the only copy); returns the step to continue from."""
    for key, obj in stateful.items():
        obj.load_state_dict(ckpt.pop(key))
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank], generator)
    elif rank == 0:
        print(f"resuming a {len(ckpt['rng'])}-process run on {world_size}: random streams restart (not exact)")
    return ckpt["step"]


def main(args):
    rank, world_size, device = devices.setup(args.device)
    control = devices.host_group()  # for waits on the host: SIGTERM, data preparation, rank 0's periodic work
    args.bf16 = devices.bf16_is_fast(device) if args.bf16 is None else args.bf16
    devices.when(rank == 0, check_out_dir, args.out, args.resume)  # an error there stops every rank, in one line
    last_pt = os.path.join(args.out, "last.pt")
    if args.resume:  # rank 0 checks it before any work, so that a bad one stops every rank with one message
        ckpt = devices.when(rank == 0, resume_run, args.out, vars(args), device)
        if rank != 0:
            ckpt = newest_good_checkpoint(args.out, map_location=device)[0]
    seed = args.seed * world_size + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)  # the flow's t, noise, pairing and flips
    autocast = devices.autocast(device, args.bf16)

    stateful, flow, params = build_training_state(vars(args), device)  # the UNet in NHWC on a CPU (devices.place)
    model, ema, embedder, ema_embedder, optimizer = stateful.values()
    # Data: rank 0 finds (or fetches, or caches) it first, then each node's first process, then the rest read it.
    images, labels = devices.in_turn(data.load_dataset, args.dataset, "train", args.data_dir, args.image_size,
                                     group=control)
    batches = data.Batches(images, labels, args.batch_size // world_size, rank, world_size, args.seed, device)
    stateful["data_state"] = batches
    step = restore(ckpt, stateful, generator, world_size, rank) if args.resume else 0
    train_model = model
    if world_size > 1:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:  # around DDP, not inside it: then DDPOptimizer overlaps the gradient all-reduce with backward
        train_model = torch.compile(train_model)

    # SIGTERM (pre-emption): finish the step, save, exit. It reaches the ranks at different steps, so they
    # agree on stopping over a host-side group (no wait on the GPU), or one would wait forever in a collective.
    sigterm, failure = [], None  # failure: rank 0's periodic work failed (then every rank stops)
    signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    if rank == 0:
        print(f"{args.model} preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters | {args.mode} on {args.dataset} | {world_size} process(es) on {device.type} | "
              f"bf16 {args.bf16} | from step {step}")
    progress = Progress(args, step, device)
    stop = False
    while step < args.max_steps and not stop:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        total, per_sample, batch = train_step(train_model, embedder, flow, optimizer, params, *batches.next(),
                                              generator, autocast, args)
        decay = ema_decay_at(step, args)
        update_ema(ema, model, decay)
        update_ema(ema_embedder, embedder, decay)
        step += 1
        progress.add(step, total, per_sample, batch)

        stop = bool(devices.all_reduce(torch.tensor(len(sigterm)), "max", group=control))
        save_now = step % args.ckpt_every == 0 or step == args.max_steps or stop
        if step % args.log_every == 0 or save_now:  # checked before every save: no poisoned checkpoint
            progress.check_finite(step, params if save_now else None)
            progress.log(step, embedder.spread() if args.embedding == "learned" else {})  # do the means keep apart?
        if save_now:
            save(step, args, stateful, generator)
            progress.saved_step = step
        # Rank 0 alone draws grids and evaluates, leaving the random streams as they were (exact resume). The
        # others wait on the host group, whose long timeout outlasts an evaluation; a failure stops every rank.
        sample_now = step % args.sample_every == 0 or step == args.max_steps  # not on SIGTERM: exit fast
        eval_now = args.eval_every and (step % args.eval_every == 0 or step == args.max_steps)
        if rank == 0 and (sample_now or eval_now):
            try:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    if sample_now:
                        write_samples(ema, ema_embedder, flow, args, step, device, autocast)
                    if eval_now:
                        evaluate_during_training(ema, ema_embedder, flow, args, step, device)
            except Exception as e:
                failure = f"rank 0's grids or evaluation at step {step} failed: {devices.error_line(e)}"
        if sample_now or eval_now:
            devices.agree(failure, group=control)
    if rank == 0:
        print(f"SIGTERM: saved step {step} to {last_pt}; continue with --resume" if stop else f"done: {last_pt}")
    devices.shutdown()


def write_line(out, record):
    with open(os.path.join(out, "log.jsonl"), "a") as log:  # closed at once: a kill leaves whole lines
        log.write(json.dumps(record) + "\n")


def write_samples(ema, ema_embedder, flow, args, step, device, autocast):
    kw = dict(device=device, steps=args.sample_steps, solver=args.sample_solver)
    with autocast:
        save_c2i_grid(ema, ema_embedder, flow, vars(args), os.path.join(args.out, f"c2i_{step:07d}.png"), **kw)
        if args.embedding != "noise":
            save_i2c_grid(ema, ema_embedder, flow, vars(args), os.path.join(args.out, f"i2c_{step:07d}.png"), **kw)


def evaluate_during_training(ema, ema_embedder, flow, args, step, device):
    result = evaluate_checkpoint_model(ema, ema_embedder, flow, vars(args), args.num_samples, cfg_scale=1.0,
                                       steps=args.sample_steps, solver=args.sample_solver, device=device)
    print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    write_line(args.out, dict(step=step, eval=result))


if __name__ == "__main__":
    devices.run_main(lambda: main(get_args()))
