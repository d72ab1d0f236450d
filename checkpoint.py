"""Checkpoints: written atomically, loaded safely, and enough on their own to rebuild a model.

A checkpoint is a plain dict of tensors and Python values (no pickled classes), so it loads with
torch.load(weights_only=True) and a stranger's file cannot run code on your machine:

    format      CHECKPOINT_FORMAT, to tell our files from any other .pt
    args        every train.py flag (a dict), with the preset resolved; model_config, data_shape,
                num_classes are among them, so sample.py / evaluate.py need no flags
    model, ema  state dicts of the raw (un-compiled, un-DDP'd) network and of its EMA
    embedder, ema_embedder   class-latent state (the means; trainable ones for 'learned')
    optimizer, step, rng, data_state   what an exact resume needs (train.py fills them)
"""
import os
import pickle
import tempfile

import torch

from embeddings import ClassEmbedder
from flow import Flow
from model_dit import DiT
from model_unet import UNet

CHECKPOINT_FORMAT = "xfm-checkpoint-v1"
MODELS = ("dit", "unet")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


def save_checkpoint(state, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    rename() within one file system is atomic, so `path` always holds either the previous complete
    checkpoint or the new complete one, whenever the process dies.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format=CHECKPOINT_FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    # fsync the directory too, so the rename itself survives a power loss.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects that could run code "
                "(xfm checkpoints hold only tensors and plain values)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a .pt file but not an xfm checkpoint (written by train.py)")
    return ckpt


def build_model(args):
    """The network described by a train.py args dict (model, model_config, data_shape, ...)."""
    channels, height, _ = args["data_shape"]
    # Indicator CFG needs two labels (conditional / null); standard CFG needs K classes + null.
    num_cond = args["num_classes"] + 1 if args["use_conditioning"] else 2
    common = dict(input_size=height, in_channels=channels, num_classes=num_cond,
                  bidirectional=args["mode"] == "bidi")
    if args["model"] == "dit":
        return DiT(**common, **args["model_config"])
    if args["model"] == "unet":
        return UNet(**common, **args["model_config"])
    raise ValueError(f"unknown --model {args['model']!r}; choose one of {', '.join(MODELS)}")


def build_flow(args):
    return Flow(args["mode"], args["lambda_b"], args["cfg_dropout"], args["ln"], args["ln_loc"],
                args["ln_scale"], args["si_scale"], args["use_conditioning"], args["num_classes"])


def build_from_checkpoint(ckpt, device="cpu", ema=True):
    """(model, embedder, flow, args) in eval mode, with the EMA weights unless ema=False."""
    args = ckpt["args"]
    model = build_model(args)
    model.load_state_dict(ckpt["ema" if ema else "model"])
    embedder_state = ckpt["ema_embedder" if ema else "embedder"]
    embedder = ClassEmbedder(embedder_state["means"], args["std_scale"], args["embedding"])
    embedder.load_state_dict(embedder_state)
    return model.to(device).eval(), embedder.to(device).eval(), build_flow(args), args
