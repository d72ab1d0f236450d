"""Checkpoints: written atomically, loaded safely, and enough on their own to rebuild a model.

A checkpoint is a plain dict of tensors and Python values (no pickled classes) tagged format=CHECKPOINT_FORMAT,
so it loads with torch.load(weights_only=True) and a stranger's file cannot run code on your machine:
    args        every train.py flag, preset resolved (with model_config, data_shape, num_classes)
    model, ema  state dicts of the raw (un-compiled, un-DDP'd) network and of its EMA
    embedder, ema_embedder   class-latent state (the means; trainable ones for 'learned')
    optimizer, step   AdamW moments and the number of updates done (the LR schedule is a function of it)
    rng         per rank: python, numpy, torch CPU and CUDA states and the flow's generator (rng_state)
    data_state  the sampler's {'epoch', 'offset'} (data.Batches): the next batch is an uninterrupted run's
"""
import json
import os
import pickle
import random
import tempfile
import zipfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

import devices
from data import atomic_write
from embeddings import ClassEmbedder, build_embedder
from flow import Flow
from model_dit import DiT
from model_unet import UNet

CHECKPOINT_FORMAT = "xfm-checkpoint-v1"
RESUME_MAY_CHANGE = ("data_dir", "device", "bf16", "compile", "out", "resume", "max_steps", "log_every", "ckpt_every",
                     "keep_every", "sample_every", "sample_steps", "sample_solver", "eval_every", "num_samples")
MODELS = {"dit": DiT, "unet": UNet}
# Flags younger than some checkpoints, at the value those were trained with: a resume compares them, a model uses them.
ADDED_FLAGS = dict(i2c_time_power=1.0, i2c_noise_scale=1.0)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


def save_checkpoint(state, path):
    atomic_write(path, lambda f: torch.save(dict(state, format=CHECKPOINT_FORMAT), f))


def rng_state(generator):
    """Every random stream training draws from, as plain values and tensors (weights_only-loadable)."""
    _, keys, *rest = np.random.get_state()  # rest: pos, has_gauss, cached_gaussian
    return dict(python=random.getstate(), numpy=(keys.tolist(), *rest), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None, generator=generator.get_state())


def set_rng_state(state, generator):
    random.setstate(state["python"])
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    generator.set_state(state["generator"])


def check_out_dir(out, resume):
    """The run directory of train.py, checked before any work: fail now, not at the first save an hour later."""
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"cannot write to --out {out}: {e.strerror}") from None
    last_pt, log_path = os.path.join(out, "last.pt"), os.path.join(out, "log.jsonl")
    if resume != os.path.exists(last_pt):
        raise ValueError(f"--resume: no {last_pt} to resume from" if resume
                         else f"{out} already holds a run: pass --resume to continue it, or another --out")
    if not resume and os.path.exists(log_path):  # a new run's steps would follow another run's in one log
        raise ValueError(f"{log_path} is left from an earlier run, with no last.pt to resume: delete it, "
                         "or use another --out")
    for partial in Path(out).glob(".tmp-*"):  # left by a save that was killed
        partial.unlink()


def newest_good_checkpoint(out, map_location="cpu"):
    """(out/last.pt, None); if it cannot be used, (the newest kept out/step_N.pt that can, a note saying so)."""
    try:
        return load_checkpoint(os.path.join(out, "last.pt"), map_location), None
    except CheckpointError as error:
        steps = sorted((int(p.stem[5:]) for p in Path(out).glob("step_*.pt") if p.stem[5:].isdigit()), reverse=True)
        for step in steps:
            try:
                ckpt = load_checkpoint(os.path.join(out, f"step_{step}.pt"), map_location)
            except CheckpointError:  # damaged too: it may be a hard link to the same damaged file as last.pt
                continue
            return ckpt, f"{error}; resuming from step {ckpt['step']} (step_{step}.pt, the newest good snapshot)"
        raise CheckpointError(f"--resume: {error}; no kept step_N.pt in {out} can be used instead") from None


def resume_run(out, args, map_location="cpu"):
    """out/last.pt (or newest_good_checkpoint's snapshot), checked to continue the run `args` describes (every flag
    but RESUME_MAY_CHANGE matches). out/log.jsonl is cut back to its step: a killed run may have logged steps the
    resumed run redoes."""
    ckpt, fallback = newest_good_checkpoint(out, map_location)
    if fallback:  # never silently: the steps since that snapshot are trained again
        print(f"--resume: {fallback}")
    plain = lambda v: tuple(v) if isinstance(v, list) else v  # --betas given on the command line is a list
    saved = {**ADDED_FLAGS, **ckpt["args"]}
    differ = [f"--{k.replace('_', '-')} ({saved[k]!r} in the checkpoint, {args[k]!r} now)" for k in saved
              if k in args and k not in RESUME_MAY_CHANGE and plain(saved[k]) != plain(args[k])]
    if differ:
        raise CheckpointError(f"--resume: this command differs from the run being resumed in {', '.join(differ)}; "
                              "repeat the original flags (only --max-steps and output/device flags may change)")
    log_path = os.path.join(out, "log.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:  # a line without its newline is a write cut short by the kill
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= ckpt["step"]]
        atomic_write(log_path, lambda f: f.writelines(kept), mode="w")
    return ckpt


def export_ema(ckpt, path):
    """Args, step and EMA weights alone in fp16, to sample from (tiny UNet: 2.4 MB; its full last.pt: 18.5 MiB)."""
    ema = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    save_checkpoint(dict(args=ckpt["args"], step=ckpt["step"], ema=ema, ema_embedder=ckpt["ema_embedder"]), path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # torch writes a CRC-32 for every record of its zip file but does not check them when loading.
        damaged = zipfile.is_zipfile(path) and zipfile.ZipFile(path).testzip()
        ckpt = None if damaged else torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load reports a damaged file in many ways (RuntimeError, EOFError, KeyError, ...)
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # it names a callable: could run any code
            raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects, which could run code "
                                  "(xfm checkpoints hold only tensors and plain values)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e!r}") from None
    if damaged:
        raise CheckpointError(f"{path} is corrupt: its record {damaged} fails its CRC check (a damaged copy?)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a .pt file but not an xfm checkpoint (written by train.py)")
    return ckpt


def build_model(args):
    channels, height, _ = args["data_shape"]
    # Indicator CFG needs two labels (conditional / null); standard CFG needs K classes + null.
    num_cond_labels = args["num_classes"] + 1 if args["use_conditioning"] else 2
    return MODELS[args["model"]](input_size=height, in_channels=channels, num_cond_labels=num_cond_labels,
                                 bidirectional=args["mode"] == "bidi", **args["model_config"])


def build_class_embedder(args):
    """The class latents described by a train.py args dict, as training starts them."""
    return build_embedder(args["embedding"], args["num_classes"], tuple(args["data_shape"]), args["std_scale"],
                          args["embedding_seed"], args["rect_size"], args["blur_sigma"], args["low_res"],
                          dataset=args["dataset"])


def build_flow(args):
    args = {**ADDED_FLAGS, **args}
    return Flow(args["mode"], args["lambda_b"], args["cfg_dropout"], args["ln"], args["ln_loc"], args["ln_scale"],
                args["si_scale"], args["use_conditioning"], args["num_classes"], args["i2c_time_power"],
                args["i2c_noise_scale"])


def build_training_state(args, device, channels_last=None):
    """A new run on `device`: ({model, ema, embedder, ema_embedder, optimizer}, flow, the trained parameters). Under
    torchrun every rank starts from rank 0's draw, the EMA too: it is copied after the broadcast. channels_last:
    None places the model as build_from_checkpoint does (devices.place); True / False forces NHWC / NCHW (bench.py)."""
    if channels_last is None:
        model = devices.place(build_model(args), device, nhwc_on_cpu=args["model"] == "unet")
    else:
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        model = build_model(args).to(device, memory_format=memory_format)
    embedder = build_class_embedder(args).to(device)
    devices.broadcast_(model, embedder)
    ema, ema_embedder = (deepcopy(m).eval().requires_grad_(False) for m in (model, embedder))
    params = list(model.parameters()) + list(embedder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args["lr"], betas=tuple(args["betas"]), weight_decay=args["weight_decay"],
                                  fused=torch.device(device).type == "cuda")
    state = dict(model=model, ema=ema, embedder=embedder, ema_embedder=ema_embedder, optimizer=optimizer)
    return state, build_flow(args), params


def build_from_checkpoint(ckpt, device="cpu"):
    """(model, embedder, flow, args) in eval mode, with the EMA weights."""
    args = ckpt["args"]
    model = devices.place(build_model(args), device, nhwc_on_cpu=args["model"] == "unet")
    model.load_state_dict(ckpt["ema"])
    embedder = ClassEmbedder(ckpt["ema_embedder"]["means"], args["std_scale"], args["embedding"])
    embedder.load_state_dict(ckpt["ema_embedder"])
    return model.eval(), embedder.to(device).eval(), build_flow(args), args
