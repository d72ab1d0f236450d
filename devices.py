"""Devices, precision and processes: the one place that knows about torchrun, bf16 and memory formats.

Under torchrun (RANK is set) every process joins one group, NCCL on GPUs and gloo on CPUs, and the scripts'
collectives (all but DDP's gradient averaging) go through here; alone, each of them is a no-op.
"""
import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def pick(device="auto"):
    """The torch.device a --device flag names: auto (CUDA where there is one, else the CPU), cpu, cuda, cuda:N."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if device == "auto" else device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def setup(device="auto"):
    """Join the process group when started by torchrun. Returns (rank, world_size, torch.device)."""
    device = pick(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return (dist.get_rank() if dist.is_initialized() else 0), world_size(), device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def when(mine, fn, *args, group=None):
    """fn(*args) where `mine` is True, while the other ranks wait. Any error there (a bad --out, a missing
    dataset, a bug) stops every rank with its one line: none waits forever in a collective."""
    result, error = None, None
    if mine:
        try:
            result = fn(*args)
        except Exception as e:
            error = error_line(e)
    agree(error, group)
    return result


def in_turn(fn, *args, group=None):
    """fn(*args) on rank 0, then on each other node's first process, then on the rest: these find the files
    (a dataset) their node's first process prepared, and a node that shares no disk with rank 0 prepares its own."""
    my_turn = 0 if is_main_process() else 1 if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 2
    return [when(turn == my_turn, fn, *args, group=group) for turn in range(3)][my_turn]


def error_line(error):
    """An exception as one line: a user error's message; anything else (a full disk, a bug) named by its type."""
    return str(error) if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {error}"


def agree(error, group=None):
    """Every rank raises the first error line any rank reports (None: no error), so that all stop together."""
    if error := next(filter(None, all_gather_object(error, group)), None):
        raise ValueError(error)


def all_reduce(tensor, op="sum", group=None):
    """In place over all processes: 'sum', 'max' or 'mean'. Returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        if op == "mean":  # SUM then divide: gloo has no AVG
            tensor /= world_size()
    return tensor


def broadcast_(*modules):
    """Rank 0's parameters and buffers copied into every process's modules, in place."""
    if dist.is_initialized():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def host_group():
    """A gloo group for small host-side flags: agreeing on them never waits for the GPU, and its wait outlasts
    rank 0's longest work (a 50k-image FID takes longer than NCCL's 10-minute watchdog). None alone."""
    return dist.new_group(backend="gloo", timeout=timedelta(hours=12)) if dist.is_initialized() else None


def all_gather_object(obj, group=None):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    gathered = [obj] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(gathered, obj, group=group)
    return gathered


def run_sharded(fn, *rows, sharded=False):
    """(out, nfe) = fn(*rows); with sharded=True under torchrun each process computes a contiguous share of the
    rows (all hold all rows, drawn from one seed) and all get every output back in order: the images of one."""
    if not (sharded and dist.is_initialized()):
        return fn(*rows)
    n, world, me = len(rows[0]), dist.get_world_size(), dist.get_rank()
    per = -(-n // world)
    mine = torch.arange(me * per, (me + 1) * per).clamp(max=n - 1)  # equal shares: all_gather needs them
    out, nfe = fn(*(r[mine.to(r.device)] for r in rows))
    pieces = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(pieces, out.contiguous())
    nfe = torch.tensor(nfe, device=out.device)
    dist.all_reduce(nfe, op=dist.ReduceOp.MAX)
    return torch.cat(pieces)[:n], int(nfe)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flag is a user error (run_main): one line, not argparse's usage-and-error from every rank."""

    def error(self, message):
        raise ValueError(f"{message} (see {self.prog} --help)")


def number(kind, low=0, high=None, strict=True):
    """An argparse type: a `kind` > low (>= low where not strict), <= high; else ArgumentParser.error's one line."""
    def parse(text):
        value = kind(text)  # a ValueError here is argparse's "invalid int value: 'ten'"
        # Negated comparisons, so that NaN (every comparison False) is refused too.
        if not (value > low if strict else value >= low) or high is not None and not value <= high:
            bounds = f"{'>' if strict else '>='} {low}" + ("" if high is None else f" and <= {high}")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int, positive_float = number(int), number(float)
non_negative_int, non_negative_float = number(int, strict=False), number(float, strict=False)
fraction = number(float, 0, 1, strict=False)  # [0, 1]


def run_main(main, errors=USER_ERRORS):
    """main(); a user error ends the process with one line `error: ...` on stderr (by rank 0) and exit code 2."""
    try:
        main()
    except errors as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        shutdown()
        sys.exit(2)


def bf16_is_fast(device):
    """bf16 autocast pays on GPUs and CPUs with native bf16 (AVX512-BF16, AMX); emulated, its GEMM ran 4.6x slower
    than fp32 on a 2-core Xeon without bf16 units (RESULTS.md, Speed)."""
    flags = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    return device.type == "cuda" or "avx512_bf16" in flags or "amx_bf16" in flags


def place(model, device, nhwc_on_cpu=False):
    """The model on `device`, a convolutional one in NHWC on a CPU, where oneDNN runs it faster (tiny UNet, fp32, batch
    8, idle 2-core Xeon: 47.2 vs 37.8 img/s); on an H100 (bf16) NHWC costs the UNet 10-17% (RESULTS.md, Speed)."""
    nhwc = nhwc_on_cpu and torch.device(device).type == "cpu"
    return model.to(device, memory_format=torch.channels_last if nhwc else torch.preserve_format)


def autocast(device, bf16):
    """The one mixed-precision context of training and benchmarking: bf16 autocast on `device`, or nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
