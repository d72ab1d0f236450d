"""Train a flow between class latents and images.

    python train.py --dataset mnist --mode bidi --preset tiny --out runs/demo      # one process
    torchrun --nproc_per_node 8 train.py --dataset cifar --mode bidi               # DDP, 8 GPUs

Defaults are the reference settings (METHOD.md §6): AdamW lr 1e-4, batch 256, EMA 0.9999, bf16,
cfg-dropout 0.1, lambda_b 0.5, and a DiT preset per dataset. `--preset tiny` is a recipe measured to
learn MNIST in minutes on a laptop CPU. One training step:

    x_image, y  <- a batch of the preloaded uint8 dataset (flipped on the device for CIFAR/ImageNet)
    loss        <- flow.loss(model, x_image, y, embedder)        (see flow.py for the math)
    AdamW step on model (+ learned class latents), EMA update, every N steps: log, sample, save.

A run directory (--out) holds last.pt (+ kept snapshots), log.jsonl and PNG sample grids.
"""
import argparse
import glob
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from checkpoint import (MODELS, CheckpointError, build_flow, build_model, load_checkpoint, place_model, resume_run,
                        rng_state, save_checkpoint, set_rng_state)
from embeddings import KINDS, build_embedder
from flow import DEFAULT_SOLVER, MODES, SOLVERS
from model_dit import DIT_PRESETS
from model_unet import UNET_PRESETS

# Training recipes by preset; flags given on the command line win. The dataset presets are the
# reference settings; 'tiny' is the CPU recipe (README: "The tiny recipe" says how it was found).
TRAIN_PRESETS = {
    "tiny": dict(lr=1e-3, batch_size=64, max_steps=800, warmup_steps=100, ema_decay=0.999, ema_warmup=True),
    "mnist": dict(max_steps=120_000),
    "cifar": dict(max_steps=300_000),
    "imagenet": dict(max_steps=400_000),
}
REFERENCE = dict(i2c_time_power=1.0, lr=1e-4, batch_size=256, max_steps=300_000, warmup_steps=0, ema_decay=0.9999, ema_warmup=False)
DEFAULT_PRESET = {"mnist": "mnist", "fashion": "mnist", "cifar": "cifar", "imagenet100": "imagenet"}
MODEL_FLAGS = {"dit": ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio"),
               "unet": ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                        "dropout", "num_heads")}


T_BUCKETS = 4  # the log splits each direction's loss over t in [0, 1/4), [1/4, 1/2), ...


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar", choices=sorted(DEFAULT_PRESET))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    p.add_argument("--mode", default="l2i", choices=MODES)
    p.add_argument("--model", default="dit", choices=MODELS)
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="default: the dataset's reference preset")
    # model shape (default: the preset's)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--mlp-ratio", type=float)
    p.add_argument("--model-channels", type=int)
    p.add_argument("--channel-mult", type=int, nargs="+")
    p.add_argument("--num-res-blocks", type=int)
    p.add_argument("--attention-resolutions", type=int, nargs="*")
    p.add_argument("--dropout", type=float)
    # class latents
    p.add_argument("--embedding", default="rectangle", choices=KINDS)
    p.add_argument("--std-scale", type=float, default=1.0)
    p.add_argument("--rect-size", type=int, default=10, help="rectangle side in pixels")
    p.add_argument("--blur-sigma", type=float, default=2.0)
    p.add_argument("--low-res", type=int, default=6, help="smoothrand noise resolution")
    p.add_argument("--embedding-seed", type=int, default=0)
    p.add_argument("--kl-weight", type=float, default=1e-3, help="KL weight of the 'learned' latents")
    # the flow
    p.add_argument("--lambda-b", type=float, default=0.5)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ln", action="store_true", help="logit-normal t")
    p.add_argument("--ln-loc", type=float, default=0.0)
    p.add_argument("--ln-scale", type=float, default=1.0)
    p.add_argument("--si-scale", type=float, default=0.0)
    p.add_argument("--i2c-time-power", type=float, help="image->class samples take t^p (flow.py; default: preset's)")
    p.add_argument("--use-conditioning", action="store_true", help="standard class CFG (noise source only)")
    # optimisation (default: the preset's, else the reference)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="global batch, split over processes")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA decay min(decay, (1+step)/(10+step)) so a short run's EMA is not its init")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the hardware has bf16 arithmetic, see bf16_is_fast)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    # run directory and periodic work
    p.add_argument("--out", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--keep-every", type=int, default=50_000, help="also keep step_N.pt every N steps")
    p.add_argument("--sample-every", type=int, default=5000)
    p.add_argument("--sample-steps", type=int, help="default: the solver's (flow.DEFAULT_STEPS)")
    p.add_argument("--sample-solver", default=DEFAULT_SOLVER, choices=SOLVERS)
    p.add_argument("--eval-every", type=int, default=0, help="FID/P/R/accuracies every N steps (0: off)")
    p.add_argument("--eval-samples", type=int, default=1000)
    args = p.parse_args(argv)
    return resolve(args)


def resolve(args):
    """Fill preset values, validate everything a user can get wrong, before any work starts.
    Errors are ValueErrors, not parser.error(), so that under torchrun one line is printed, by rank 0."""
    args.preset = args.preset or DEFAULT_PRESET[args.dataset]
    for key, value in {**REFERENCE, **TRAIN_PRESETS[args.preset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    presets = DIT_PRESETS if args.model == "dit" else UNET_PRESETS
    config = dict(presets[args.preset])
    for key in MODEL_FLAGS[args.model]:
        if getattr(args, key) is not None:
            config[key] = tuple(getattr(args, key)) if isinstance(getattr(args, key), list) else getattr(args, key)
    args.model_config = config
    args.data_shape = data.dataset_shape(args.dataset, args.image_size)
    args.num_classes = data.num_classes(args.dataset)
    if args.embedding == "noise":
        args.std_scale = 1.0
    if args.use_conditioning and args.embedding != "noise":
        raise ValueError("--use-conditioning is standard class CFG for a noise source; a class-latent source "
                         "already carries the class (use --embedding noise, or drop --use-conditioning)")
    if args.embedding == "noise" and args.mode != "l2i":
        raise ValueError("--embedding noise has no class to read back: use --mode l2i")
    if not 0 <= args.lambda_b <= 1:
        raise ValueError(f"--lambda-b must lie in [0, 1], got {args.lambda_b}")
    if not 0 <= args.cfg_dropout < 1:
        raise ValueError(f"--cfg-dropout must lie in [0, 1), got {args.cfg_dropout}")
    if args.std_scale < 0:
        raise ValueError(f"--std-scale must be >= 0, got {args.std_scale}")
    for key in ("lr", "batch_size", "max_steps", "log_every", "ckpt_every", "keep_every", "sample_every",
                "sample_steps"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:  # None: the default (sample_steps)
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    return args


def bf16_is_fast(device):
    """bf16 autocast pays on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX). On other CPUs
    PyTorch emulates it, and a training step is about 10x slower than fp32 (README, Speed)."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; without them this is one process. NCCL on GPUs, gloo on CPU."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, int(os.environ.get("WORLD_SIZE", 1))
    # Checked before the process group exists: every rank fails alike, and none dies mid-handshake.
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    if ddp:
        dist.init_process_group(backend="nccl" if args.device == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.bf16 is None:
        args.bf16 = bf16_is_fast(device)
    return ddp, rank, world_size, device


USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, FloatingPointError)


def on_rank0(fn, ddp, master):
    """Run fn on rank 0 and share the outcome: a user error there must stop every rank at once,
    not leave the others waiting forever in the next collective."""
    result, error = None, None
    if master:
        try:
            result = fn()
        except USER_ERRORS as e:
            error = str(e)
    if ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)
    return result


def check_out_dir(args):
    """Fail now, not at the first save an hour from now."""
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to --out {args.out}: {e.strerror}") from None
    if not args.resume and os.path.exists(os.path.join(args.out, "last.pt")):
        raise ValueError(f"{args.out} already holds a run: pass --resume to continue it, or another --out")
    if args.resume and not os.path.exists(os.path.join(args.out, "last.pt")):
        raise ValueError(f"--resume: no {os.path.join(args.out, 'last.pt')} to resume from")
    for partial in glob.glob(os.path.join(args.out, ".tmp-*.pt")):  # left by a save that was killed
        os.remove(partial)


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params = list(ema.parameters())
    if ema_params:  # one multi-tensor kernel, not one launch per parameter (~100 for a DiT)
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def train_step(train_model, embedder, flow, optimizer, params, x_uint8, y, generator, autocast, args, ddp=False):
    """One optimisation step on a uint8 batch (bench.py times exactly this). Returns (total loss,
    per-sample loss, the flow's batch), all left on the device: nothing here waits for the GPU."""
    x_image = data.to_unit_range(x_uint8)
    if args.dataset in data.FLIP_DATASETS:
        x_image = data.random_hflip(x_image, generator)
    with autocast:
        loss, per_sample, batch = flow.loss(train_model, x_image, y, embedder, generator)
        total = loss + args.kl_weight * embedder.kl_loss()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if ddp and args.embedding == "learned":  # the class latents live outside DDP: average by hand
        for p in embedder.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    return total, per_sample, batch


def lr_at(step, args):
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def main(args):
    ddp, rank, world_size, device = setup_distributed(args)
    master = rank == 0
    on_rank0(lambda: check_out_dir(args), ddp, master)
    control = dist.new_group(backend="gloo") if ddp else None  # for host-side flags: no wait on the GPU
    # Rank 0 checks the checkpoint before any work, so that a bad one stops every rank with one message.
    if args.resume:
        ckpt = on_rank0(lambda: resume_run(args.out, vars(args), device), ddp, master)
        ckpt = ckpt if master else load_checkpoint(os.path.join(args.out, "last.pt"), map_location=device)
    seed = args.seed * world_size + rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)  # the flow's t, noise, pairing and flips
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    # Data: rank 0 finds (or fetches, or caches) it first; the others then read what it wrote.
    load_train = lambda: data.load_dataset(args.dataset, "train", args.data_dir, args.image_size)
    loaded = on_rank0(load_train, ddp, master)
    images, labels = loaded if master else load_train()
    batches = data.Batches(images, labels, args.batch_size // world_size, rank, world_size, args.seed, device)

    model = place_model(build_model(vars(args)), args.model, device)  # NHWC where it pays
    embedder = build_embedder(args.embedding, args.num_classes, args.data_shape, args.std_scale,
                              args.embedding_seed, args.rect_size, args.blur_sigma, args.low_res,
                              dataset=args.dataset).to(device)
    ema, ema_embedder = deepcopy(model).eval(), deepcopy(embedder).eval()
    for p in list(ema.parameters()) + list(ema_embedder.parameters()):
        p.requires_grad_(False)
    flow = build_flow(vars(args))
    params = list(model.parameters()) + list(embedder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")

    step = 0
    if args.resume:
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"])
        embedder.load_state_dict(ckpt["embedder"]), ema_embedder.load_state_dict(ckpt["ema_embedder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.load_state_dict(ckpt["data_state"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world_size:
            set_rng_state(ckpt["rng"][rank], generator)
        elif master:
            print(f"resuming on {world_size} processes from a {len(ckpt['rng'])}-process run: "
                  "random streams restart (not an exact resume)")
        del ckpt

    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(path):
        rngs = [None] * world_size
        if ddp:
            dist.all_gather_object(rngs, rng_state(generator))
        else:
            rngs[0] = rng_state(generator)
        if master:
            save_checkpoint(dict(args=vars(args), model=model.state_dict(), ema=ema.state_dict(),
                                 embedder=embedder.state_dict(), ema_embedder=ema_embedder.state_dict(),
                                 optimizer=optimizer.state_dict(), step=step, rng=rngs,
                                 data_state=batches.state_dict()), path)

    stop_requested = []  # SIGTERM (pre-emption): finish the step, save, exit cleanly
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} preset {args.preset}: {n_params / 1e6:.2f}M parameters | {args.mode} on {args.dataset} "
              f"| {world_size} process(es) on {device.type} | bf16 {args.bf16} | from step {step}")

    # Running sums stay on the device so the loop never waits for the GPU except when it logs.
    # Loss sums and counts by direction (c2i, i2c) and by quarter of t: where in t each direction learns.
    sums, counts = torch.zeros(2, T_BUCKETS, device=device), torch.zeros(2, T_BUCKETS, device=device)
    first_bad_step = torch.tensor(-1, device=device)
    t_last, step_last, saved_step = time.time(), step, step
    model.train()
    while step < args.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x_uint8, y = batches.next()
        if step + 1 == int(os.environ.get("XFM_TEST_NAN_AT_STEP", -1)):  # test-only: poison the weights
            torch._foreach_mul_([p.detach() for p in params], math.nan)
        total, per_sample, batch = train_step(train_model, embedder, flow, optimizer, params, x_uint8, y,
                                              generator, autocast, args, ddp)
        decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
        update_ema(ema, model, decay), update_ema(ema_embedder, embedder, decay)
        step += 1

        cell = batch["direction"] * T_BUCKETS + (batch["t"] * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
        sums.view(-1).index_add_(0, cell, per_sample.detach().float())
        counts.view(-1).index_add_(0, cell, torch.ones_like(per_sample, dtype=torch.float))
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(total.detach()),
                                     torch.full((), step, device=device), first_bad_step)

        stop = torch.tensor(len(stop_requested))
        if ddp:  # SIGTERM reaches the ranks at different steps: they must agree, or one waits forever
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=control)
        last = step == args.max_steps or bool(stop)
        save_now = step % args.ckpt_every == 0 or last
        if step % args.log_every == 0 or save_now:  # checked before every save: no poisoned checkpoint
            if save_now:  # an inf gradient can follow a finite loss: check the very weights to be saved
                finite = torch.stack([p.isfinite().all() for p in params]).all()
                first_bad_step = torch.where((first_bad_step < 0) & ~finite, step, first_bad_step)
            if ddp:
                dist.all_reduce(first_bad_step, op=dist.ReduceOp.MAX)
            if first_bad_step.item() >= 0:
                kept = f"{args.out}/last.pt keeps step {saved_step}" if saved_step else "no checkpoint was written"
                raise FloatingPointError(f"loss or weights became non-finite at step {first_bad_step.item()}; "
                                         f"stopped without saving, {kept} (try a lower --lr)")
        if step % args.log_every == 0 or last:
            if ddp:
                dist.all_reduce(sums)
                dist.all_reduce(counts)
            now = time.time()
            img_per_s = (step - step_last) * args.batch_size / (now - t_last)
            eta = (args.max_steps - step) * args.batch_size / max(img_per_s, 1e-9)
            record = dict(step=step, loss=(sums.sum() / counts.sum()).item(), lr=lr_at(step - 1, args),
                          img_per_s=img_per_s)
            for name, s, n in zip(("c2i", "i2c"), sums.tolist(), counts.tolist()):
                if sum(n):
                    record[f"loss_{name}"] = sum(s) / sum(n)
                    record[f"loss_{name}_by_t"] = [si / ni if ni else None for si, ni in zip(s, n)]
            if master:
                parts = " ".join(f"{k[5:]} {record[k]:.4f}" for k in ("loss_c2i", "loss_i2c") if k in record)
                print(f"step {step}/{args.max_steps} | loss {record['loss']:.4f} {parts} | "
                      f"{img_per_s:.0f} img/s | ETA {eta / 60:.1f} min", flush=True)
                log.write(json.dumps(record) + "\n"), log.flush()
            sums.zero_()
            counts.zero_()
            t_last, step_last = now, step
        if save_now:
            save(os.path.join(args.out, "last.pt"))
            saved_step = step
            snapshot = os.path.join(args.out, f"step_{step}.pt")
            if master and step % args.keep_every == 0 and not os.path.exists(snapshot):
                os.link(os.path.join(args.out, "last.pt"), snapshot)  # a hard link: no second copy on disk
        # Rank-0 work: its errors stop every rank; it leaves the random streams as they were (exact resume).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if step % args.sample_every == 0 or step == args.max_steps:  # not on SIGTERM: exit fast
                on_rank0(lambda: write_samples(ema, ema_embedder, flow, args, step, device, autocast), ddp, master)
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
                record = on_rank0(lambda: evaluate_during_training(ema, ema_embedder, flow, args, step, device),
                                  ddp, master)
                if master:
                    log.write(json.dumps(record) + "\n"), log.flush()
        if stop:
            if master:
                print(f"SIGTERM: saved step {step} to {args.out}/last.pt; continue with --resume")
            break
    if master:
        log.close()
        print(f"done: {args.out}/last.pt")
    if ddp:
        dist.destroy_process_group()


def write_samples(ema, ema_embedder, flow, args, step, device, autocast):
    from sample import save_c2i_grid, save_i2c_grid
    with autocast:
        save_c2i_grid(ema, ema_embedder, flow, vars(args), os.path.join(args.out, f"c2i_{step:07d}.png"),
                             device=device, steps=args.sample_steps, solver=args.sample_solver)
        if args.embedding != "noise":
            save_i2c_grid(ema, ema_embedder, flow, vars(args), os.path.join(args.out, f"i2c_{step:07d}.png"),
                          device=device, steps=args.sample_steps, solver=args.sample_solver)


def evaluate_during_training(ema, ema_embedder, flow, args, step, device):
    from evaluate import evaluate_checkpoint_model
    result = evaluate_checkpoint_model(ema, ema_embedder, flow, vars(args), num_samples=args.eval_samples,
                                       cfg_scale=1.0, steps=args.sample_steps, solver=args.sample_solver,
                                       device=device)
    print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return dict(step=step, eval=result)


if __name__ == "__main__":
    try:
        main(get_args())
    except USER_ERRORS as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank fails alike; say it once
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
