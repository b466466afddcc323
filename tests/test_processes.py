"""Training with several processes (torchrun over gloo on this CPU): every method's adapter after K steps
equals one process with the same global batch, dual's screening and SRLoRA's weight edits included;
gradient accumulation all-reduces once per step; an interrupted two-process run resumes to the
uninterrupted result, with two processes or with one at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli, write_jsonl

from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
from lrsurgery.data.examples import DataSpec
from lrsurgery.io.artifacts import load_tensors
from lrsurgery.layers.adapter_file import ADAPTER_FILE
from lrsurgery.methods import TrainHooks
from lrsurgery.stages.init import run_init
from lrsurgery.training.processes import check_same_frozen_weights
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COMMON = ["--seq-len", "32", "--lr", "1e-2", "--warmup-ratio", "0"]
# per method: init options (no dropout: N processes draw other masks than one), train flags that put a dual
# screening and an SRLoRA switch inside 4 steps
METHODS = {
    "lora": ({"rank": 2}, []),
    "tlora": ({"rank": 2}, []),
    "dual": ({"r_share": 2, "r_expert": 2, "expert_dropout": 0.0}, ["--t1", "0.25", "--t2", "0.75", "--delta-t", "1"]),
    "srlora": ({"rank": 2, "r_target": 6}, ["--switch-interval", "2"]),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Language-modelling text: every block holds seq_len tokens, so the mean of the processes' losses is
    the global batch's mean and only the order of the sums differs between 1 and 2 processes."""
    out = tmp_path_factory.mktemp("lm") / "lm.jsonl"
    return write_jsonl(out, [{"text": " ".join(f"word{i % 97} and more text number {i}." for i in range(600))}])


def _torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ‖a − b‖ / ‖a‖ (Frobenius) over the tensors of two adapter files.

    The bounds on it below hold on any CPU: runs that differ only in the order of their fp32 sums start
    apart by about the unit roundoff u = 6e-8, which is the same on every machine (another kernel picks
    other roundings, not larger ones), and how much training amplifies that is a property of the model,
    data and schedule, not of the machine. AdamW moves every element by about lr per step, so a run that
    trained (or saw another batch) is ~lr = 1e-2 away, far above 1e-3."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).double().norm() / a[k].double().norm().clamp_min(1e-30)) for k in a)


def _wait_until_unlocked(lock: Path, seconds: float = 60) -> None:
    """Wait for the killed processes to be gone: the kernel drops their `flock` once their files are closed."""
    import fcntl

    deadline = time.monotonic() + seconds
    while True:
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{lock} is still locked"
        time.sleep(0.1)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_with_the_same_global_batch(method, tiny_llama, text, tmp_path):
    """2 processes × batch 2 against 1 process × batch 4, 4 steps of fp32. The same gradients summed in
    another order (relative ~1e-7) change each AdamW update (≤ lr) by about as much, so after 4 steps
    the two adapters agree to 1e-5 relative; a process training on other rows, or a screening or switch
    decided differently, would move them by ~1e-2."""
    options, flags = METHODS[method]
    if method == "tlora":
        cfg = CalibrateConfig(samples=4, seq_len=32, collect=("covariance", "sensitivity"))
        options = {
            **options,
            "stats": str(run_calibrate(str(tiny_llama), DataSpec(path=str(text)), cfg, tmp_path / "s")),
        }
    init = run_init(str(tiny_llama), method, tmp_path / "init", options)
    train = ["train", init, "--data", text, *COMMON, "--max-steps", "4", *flags]
    done = _torchrun("-m", "lrsurgery", *train, "--batch-size", "2", "-o", tmp_path / "two")
    assert done.stdout.count("wrote") == 1  # the main process alone reports
    code, out = cli(*train, "--batch-size", "4", "-o", tmp_path / "one")
    assert code == 0, out
    one, two = load_tensors(tmp_path / "one" / ADAPTER_FILE), load_tensors(tmp_path / "two" / ADAPTER_FILE)
    assert _relative_error(one, two) <= 1e-5
    start = load_tensors(init / ADAPTER_FILE)  # and the steps did train
    assert _relative_error({k: one[k] for k in start}, start) > 1e-3
    extra = json.loads((tmp_path / "two" / "manifest.json").read_text())["extra"]
    if method == "srlora":  # switched (each switch checked that both processes edited W alike)
        assert extra["srlora"]["switch_steps"]
    if method == "dual":
        assert extra["dual"]["k_schedule"]


@pytest.mark.parametrize("method", ["lora", "dual", "srlora"])
def test_sharded_training_equals_one_process(method, tiny_llama, text, tmp_path):
    """`--shard fsdp` over 2 processes (FSDP2 on gloo: each holds half of every frozen weight's rows) against
    1 process with the doubled batch, with held-out losses on the way: the same bound as data parallel, a
    dual screening and an SRLoRA switch included (the switch adds each process's rows of B·A to its shard)."""
    options, flags = METHODS[method]
    init = run_init(str(tiny_llama), method, tmp_path / "init", options)
    train = ["train", init, "--data", text, "--eval-data", text, "--eval-every", "2", *COMMON, "--max-steps", "4"]
    done = _torchrun("-m", "lrsurgery", *train, *flags, "--batch-size", "2", "--shard", "fsdp", "-o", tmp_path / "two")
    assert done.stdout.count("wrote") == 1
    code, out = cli(*train, *flags, "--batch-size", "4", "-o", tmp_path / "one")
    assert code == 0, out
    one, two = load_tensors(tmp_path / "one" / ADAPTER_FILE), load_tensors(tmp_path / "two" / ADAPTER_FILE)
    assert _relative_error(one, two) <= 1e-5
    first, second = (json.loads((tmp_path / r / "manifest.json").read_text())["extra"] for r in ("one", "two"))
    # the held-out loss of adapters that agree to 1e-5 (above), on the same rows: the same machine-free bound
    assert abs(first["eval"]["loss"] - second["eval"]["loss"]) <= 1e-5 * abs(first["eval"]["loss"])
    assert (first["processes"], second["processes"]) == ({"count": 1, "shard": "none"}, {"count": 2, "shard": "fsdp"})
    if method == "lora":  # accelerate's own FSDP switch starts the same sharded run
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision"]
        launch += ["no", "--dynamo_backend", "no", "--use_fsdp", "--num_processes", "2", "-m", "lrsurgery"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [*launch, *map(str, train), "--batch-size", "2", "-o", str(tmp_path / "accelerate")]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _relative_error(one, load_tensors(tmp_path / "accelerate" / ADAPTER_FILE)) <= 1e-5
        manifest = json.loads((tmp_path / "accelerate" / "manifest.json").read_text())
        assert manifest["extra"]["processes"] == {"count": 2, "shard": "fsdp"}
    if method == "srlora":
        assert second["srlora"]["switch_steps"] == first["srlora"]["switch_steps"] != []
        assert any(".edit." in k for k in two)  # the edits of W are in the adapter, compared above
    if method == "dual":
        assert second["dual"]["k_schedule"] == first["dual"]["k_schedule"] != []


def test_accelerate_launch_starts_the_processes_torchrun_does(tiny_llama, text, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA: two CPU processes over
    gloo, the same run as torchrun's; `--cpu` starts one process, and says so."""
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    train = ["train", init, "--data", text, *COMMON, "--max-steps", "2", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    for flags, out in ((["--multi_gpu", "--num_processes", "2"], "accelerate"), (["--cpu"], "single")):
        command = [*launch, *flags, "-m", "lrsurgery", *map(str, train), "-o", str(tmp_path / out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("starts one process" in done.stderr) == (out == "single")
    _torchrun("-m", "lrsurgery", *train, "-o", tmp_path / "torchrun")
    code, out = cli(*train[:-1], "4", "-o", tmp_path / "one")
    assert code == 0, out
    one = load_tensors(tmp_path / "one" / ADAPTER_FILE)
    assert _relative_error(one, load_tensors(tmp_path / "accelerate" / ADAPTER_FILE)) <= 1e-5
    assert _relative_error(one, load_tensors(tmp_path / "torchrun" / ADAPTER_FILE)) <= 1e-5
    assert _relative_error(one, load_tensors(tmp_path / "single" / ADAPTER_FILE)) > 1e-3  # batch 2, not 4


def test_gradient_accumulation_over_two_processes(tiny_llama, text, tmp_path):
    """2 processes × 2 micro-batches of 1 row make the same global batch as 1 process × batch 4."""
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    train = ["train", init, "--data", text, *COMMON, "--max-steps", "3"]
    _torchrun("-m", "lrsurgery", *train, "--batch-size", "1", "--grad-accum", "2", "-o", tmp_path / "two")
    code, out = cli(*train, "--batch-size", "4", "-o", tmp_path / "one")
    assert code == 0, out
    one, two = load_tensors(tmp_path / "one" / ADAPTER_FILE), load_tensors(tmp_path / "two" / ADAPTER_FILE)
    assert _relative_error(one, two) <= 1e-5


class CountNoSync(TrainHooks):
    """Counts the micro-batches run under `accelerator.no_sync` (gradients kept local, no all-reduce)."""

    def __init__(self):
        self.calls = 0

    def setup(self, ctx):
        no_sync = ctx.accelerator.no_sync

        def counted(model):
            self.calls += 1
            return no_sync(model)

        ctx.accelerator.no_sync = counted


def test_accumulation_syncs_only_on_the_last_micro_batch(tiny_llama, text, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    counter = CountNoSync()
    cfg = TrainConfig(max_steps=2, batch_size=1, grad_accum=3, lr=1e-2)
    run_train(init, DataSpec(path=str(text), seq_len=32), cfg, tmp_path / "run", hooks=[counter])
    assert counter.calls == 2 * (3 - 1)


class Gathered:
    """An accelerator stand-in whose `gather` returns this process's tensor and another process's."""

    def __init__(self, other: torch.Tensor):
        self.other = other

    def gather(self, mine: torch.Tensor) -> torch.Tensor:
        return torch.cat([mine, self.other.unsqueeze(0)])


def test_different_frozen_weights_on_two_processes_are_caught(tiny_llama, tmp_path):
    from lrsurgery.stages.adapted import load_adapted
    from lrsurgery.training.processes import weight_checksums

    init = run_init(str(tiny_llama), "srlora", tmp_path / "init", {"rank": 2, "r_target": 6})
    model = load_adapted(init)[0].model
    layers = {n: m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "edits")}
    same = weight_checksums(layers)
    check_same_frozen_weights(Gathered(same.clone()), layers, step=3)
    name = next(iter(layers))
    with torch.no_grad():
        layers[name].base.weight[0, 0] += 1e-6  # one process's edit rounded differently (the check is exact)
    with pytest.raises(RuntimeError, match=f"after step 4 the processes hold different frozen weights in .*{name}"):
        check_same_frozen_weights(Gathered(same), layers, step=3)


def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tiny_llama, text, tmp_path):
    """Killed (SIGKILL, torchrun and its workers) after a checkpoint, a 2-process SRLoRA run resumes
    with 2 processes to the uninterrupted run's adapter bit for bit, and sharded (`--shard fsdp`) to it
    within the data-parallel bound; with 1 process at another global batch it is refused, and 1 process at
    the same global batch continues it."""
    init = run_init(str(tiny_llama), "srlora", tmp_path / "init", {"rank": 2, "r_target": 6})
    # long enough that a checkpoint is seen well before the end, whatever the machine's speed
    train = ["train", init, "--data", text, *COMMON, "--max-steps", "120", "--save-every", "4"]
    train += ["--switch-interval", "3", "--batch-size", "2"]
    _torchrun("-m", "lrsurgery", *train, "-o", tmp_path / "whole")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        [*TORCHRUN, "-m", "lrsurgery", *map(str, train), "-o", str(tmp_path / "cut")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "cut.partial" / "checkpoint" / "checkpoint.json"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill them with it, as a machine's crash would
    import psutil

    for process in [*psutil.Process(run.pid).children(recursive=True), psutil.Process(run.pid)]:
        process.kill()
    run.wait()
    _wait_until_unlocked(tmp_path / ".cut.lock")
    assert checkpoint.is_file() and not (tmp_path / "cut").exists()
    code, out = cli(*train, "-o", tmp_path / "cut", "--resume")
    assert code == 1 and "different settings (global_batch)" in out
    partial = tmp_path / "cut.partial"
    backup, sharded = tmp_path / "backup.partial", tmp_path / "sharded.partial"
    subprocess.run(["cp", "-a", str(partial), str(backup)], check=True)
    subprocess.run(["cp", "-a", str(partial), str(sharded)], check=True)
    _torchrun("-m", "lrsurgery", *train, "-o", tmp_path / "cut", "--resume")
    whole = load_tensors(tmp_path / "whole" / ADAPTER_FILE)
    resumed = load_tensors(tmp_path / "cut" / ADAPTER_FILE)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    # resumed sharded: the checkpoint's weight edits replayed into each process's rows of W
    _torchrun("-m", "lrsurgery", *train, "--shard", "fsdp", "-o", tmp_path / "sharded", "--resume")
    assert _relative_error(whole, load_tensors(tmp_path / "sharded" / ADAPTER_FILE)) <= 1e-5
    backup.rename(tmp_path / "single.partial")
    single = [*train[: train.index("--batch-size")], "--batch-size", "4"]
    code, out = cli(*single, "-o", tmp_path / "single", "--resume")
    assert code == 0, out
    # the same global batches from the checkpoint on, summed in another order: close, not bitwise
    assert _relative_error(whole, load_tensors(tmp_path / "single" / ADAPTER_FILE)) <= 1e-3


def test_calibrate_over_two_processes_equals_one(tiny_llama, text, tmp_path):
    """Three micro-batches over two processes (two on one, one on the other): every covariance sum,
    per-sequence sum and sensitivity equals the one-process calibration's. Both run with one thread, so each
    micro-batch's activations and gradients are computed by the same kernels; only the order in which the
    micro-batches' fp64 sums are added differs, so each stored tensor agrees to a few units of its own
    dtype's roundoff. Both offload to disk: each process spills its block inputs to a folder of its own."""
    args = ["calibrate", tiny_llama, "--data", text, "--samples", "6", "--batch-size", "2", "--seq-len", "32"]
    args += ["--dtype", "fp64", "--offload", "disk"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lrsurgery", *map(str, args), "-o", str(one)], env=env, text=True)
    assert done.returncode == 0
    _torchrun("-m", "lrsurgery", *args, "-o", two)
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert files == sorted(p.name for p in two.glob("*.safetensors")) and "sensitivity.safetensors" in files
    for name in files:
        a, b = load_tensors(one / name), load_tensors(two / name)
        assert a.keys() == b.keys(), name
        for key in a:
            if not a[key].is_floating_point():
                assert torch.equal(a[key], b[key]), (name, key)
                continue
            error = float((a[key] - b[key]).double().norm() / a[key].double().norm().clamp_min(1e-300))
            assert error <= 4 * torch.finfo(a[key].dtype).eps, (name, key, error)
    first, second = (json.loads((p / "manifest.json").read_text())["extra"] for p in (one, two))
    assert first["tokens"] == second["tokens"] and first["sensitivity"] == second["sensitivity"]
    assert (first["processes"], second["processes"]) == (1, 2)
    too_many = [*args[:5], "2", *args[6:], "-o", tmp_path / "three"]  # one micro-batch for two processes
    done = subprocess.run([*TORCHRUN, "-m", "lrsurgery", *map(str, too_many)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "1 micro-batch(es) for 2 processes" in done.stderr
    assert not (tmp_path / "three").exists()


def test_deepspeed_is_refused_with_a_pointer_to_fsdp(tiny_llama, text, tmp_path, monkeypatch):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code, out = cli("train", init, "--data", text, *COMMON, "--max-steps", "1", "-o", tmp_path / "run")
    assert code == 1 and "DeepSpeed is not supported" in out and "--shard fsdp" in out
    assert "Traceback" not in out and not (tmp_path / "run").exists()
    assert not (tmp_path / "run.partial").exists()
