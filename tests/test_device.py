"""`--device`: init's linear algebra and calibration on a GPU give what the CPU gives; a device that is not
there is refused before anything is read or written. The GPU tests run where CUDA is available."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import EXAMPLES, FP32_UNIT, assert_adapted_equals_base, cli

from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
from lrsurgery.calibration.stats_file import load_covariance
from lrsurgery.data.assets import shakespeare
from lrsurgery.data.examples import DataSpec
from lrsurgery.evaluation.runner import load_for_eval, run_eval, score
from lrsurgery.evaluation.tasks import Task
from lrsurgery.hf.load import compute_device, load_model
from lrsurgery.hf.resolve import ModelError
from lrsurgery.layers.adapter_file import read_adapters
from lrsurgery.linalg.svd import subspace_distance
from lrsurgery.stages.init import run_init

TASKS = EXAMPLES / "tasks"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BOTH = ("covariance", "sensitivity")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tiny_llama, bbc_small, tmp_path):
    code, out = cli("init", tiny_llama, "--method", "pissa", "--device", "cuda", "-o", tmp_path / "i")
    assert code == 1 and "no CUDA device is available" in out and "--device cpu" in out
    assert not (tmp_path / "i").exists()
    code, out = cli("calibrate", tiny_llama, "--data", bbc_small, "--device", "cuda", "-o", tmp_path / "s")
    assert code == 1 and "no CUDA device is available" in out
    assert not (tmp_path / "s").exists()
    code, out = cli("eval", tiny_llama, "--task", TASKS / "bbc_topic.yaml", "--device", "cuda", "-o", tmp_path / "r")
    assert code == 1 and "no CUDA device is available" in out
    assert not (tmp_path / "r").exists()


def test_unknown_devices_are_refused():
    for spec, message in (("mps", "not supported"), ("gpu", "not a device"), ("cuda:x", "not a device")):
        with pytest.raises(ModelError, match=message):
            compute_device(spec)
    assert compute_device("cpu") == torch.device("cpu")


def test_init_records_its_device(tiny_llama, tmp_path):
    init = run_init(str(tiny_llama), "pissa", tmp_path / "i", {"rank": 2}, device="cpu")
    assert json.loads((init / "manifest.json").read_text())["config"]["device"] == "cpu"


def _factors(init):
    """Each module's dense s·B·A of the main branch (fp64), the sign-free form of an SVD-derived adapter."""
    return {name: adapter.product() for name, adapter in read_adapters(init)[1].items()}


@gpu
@pytest.mark.slow
@pytest.mark.parametrize("method, options", [("pissa", {"rank": 8}), ("dual", {"r_share": 4, "r_expert": 4})])
def test_svd_init_on_the_gpu_equals_the_cpu_and_leaves_output_unchanged(smollm2, tmp_path, method, options):
    """Both devices take fp32 SVDs, whose top-r part is accurate to about u·‖W‖/gap (backward stability,
    whatever the library): each device's error against an fp64 SVD is measured, and the GPU's may be at
    most 10 times the CPU's (cuSOLVER and LAPACK differ in algorithm, not in accuracy class)."""
    on_cpu = run_init(str(smollm2), method, tmp_path / "cpu", options)
    on_gpu = run_init(str(smollm2), method, tmp_path / "gpu", options, device="cuda")
    cpu_factors, gpu_factors = _factors(on_cpu), _factors(on_gpu)
    assert cpu_factors.keys() == gpu_factors.keys()
    root = load_model(smollm2, task="base").model
    rank = options.get("rank") or options["r_share"]
    for name, product in cpu_factors.items():
        u, s, vh = torch.linalg.svd(root.get_submodule(name).weight.detach().double(), full_matrices=False)
        exact = (u[:, :rank] * s[:rank]) @ vh[:rank]
        cpu_error = float((product - exact).abs().max())
        gpu_error = float((gpu_factors[name] - exact).abs().max())
        assert gpu_error <= 10 * cpu_error + 64 * FP32_UNIT * float(exact.abs().max()), (name, gpu_error, cpu_error)
    assert_adapted_equals_base(on_gpu, smollm2)


@gpu
@pytest.mark.slow
def test_tlora_init_on_the_gpu_spans_the_cpu_subspaces(smollm2, bbc_small, tmp_path):
    cfg = CalibrateConfig(samples=4, seq_len=64, batch_size=2, collect=BOTH)
    stats = run_calibrate(str(smollm2), DataSpec(path=str(bbc_small)), cfg, tmp_path / "stats")
    options = {"rank": 8, "alpha": 16, "stats": str(stats)}
    cpu_manifest, cpu_adapters, _ = read_adapters(run_init(str(smollm2), "tlora", tmp_path / "cpu", options))
    gpu_manifest, gpu_adapters, _ = read_adapters(
        run_init(str(smollm2), "tlora", tmp_path / "gpu", options, device="cuda")
    )
    assert gpu_manifest.extra["method"]["ranks"] == cpu_manifest.extra["method"]["ranks"]
    assert gpu_manifest.config["device"].startswith("cuda")
    # Both devices solve the same fp64 Gram problems; the subspaces' error is set by the Grams'
    # conditioning, not by the device: test_tlora bounds each at 1e-5 from the exact SVD of W·C (worst
    # seen 1.5e-6, layers.11.mlp.down_proj), so two of them are within 2e-5 of each other.
    worst = max(subspace_distance(gpu_adapters[n].A, a.A) for n, a in cpu_adapters.items())
    assert worst <= 2e-5, worst


@gpu
@pytest.mark.slow
def test_calibration_on_the_gpu_equals_the_cpu(smollm2, bbc_small, tmp_path):
    cfg = {"samples": 4, "seq_len": 64, "batch_size": 2, "collect": BOTH}
    data = DataSpec(path=str(bbc_small))
    on_cpu = run_calibrate(str(smollm2), data, CalibrateConfig(**cfg), tmp_path / "cpu")
    on_gpu = run_calibrate(str(smollm2), data, CalibrateConfig(**cfg, device="cuda"), tmp_path / "gpu")
    tokens = json.loads((on_cpu / "manifest.json").read_text())["extra"]["tokens"]
    for name in ("layers.0.self_attn.q_proj", "layers.14.mlp.down_proj", "layers.29.mlp.up_proj"):
        want, got = load_covariance(on_cpu, name).double(), load_covariance(on_gpu, name).double()
        # fp32 sums of `tokens` outer products on each device: within n·u of the exact sum (Higham's
        # bound for any summation order), so within 2·n·u of each other, plus the activations' rounding
        assert float((got - want).norm() / want.norm()) <= 4 * tokens * FP32_UNIT, name


def _generation_task(folder: Path) -> Path:
    """bbc_topic as a greedy generation task: the topic word the model writes after the article."""
    spec = yaml.safe_load((TASKS / "bbc_topic.yaml").read_text())
    del spec["doc_to_choice"]
    spec.update(
        task="bbc_topic_gen",
        output_type="generate_until",
        generation_kwargs={"until": ["\n", "."], "max_gen_toks": 4, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    )
    path = folder / "bbc_topic_gen.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@gpu
@pytest.mark.slow
def test_eval_on_the_gpu_scores_what_the_cpu_scores(smollm2, bbc, tmp_path, monkeypatch):
    """Each request's fp32 log-likelihood on the GPU is as close to the fp64 CPU value as the fp32 CPU one
    is (within 10 times its error, plus a few units of the values' rounding); greedy generations equal
    the CPU's wherever the CPU's fp32 and fp64 runs agree (a near-tie may fall either way in fp32)."""
    monkeypatch.setenv("BBC_DATA", str(bbc))
    monkeypatch.setenv("SHAKESPEARE_DATA", str(tmp_path / "plays"))
    shakespeare(tmp_path / "plays", test_plays=1)
    for path in (TASKS / "bbc_topic.yaml", TASKS / "shakespeare_ppl.yaml", _generation_task(tmp_path)):
        task = Task.from_yaml(path)
        docs = sorted(task.docs(), key=lambda doc: len(str(task.target(doc))))[:4]  # the shortest four
        runs = []
        for device, dtype in (("cpu", "fp64"), ("cpu", "fp32"), ("cuda", "fp32")):
            loaded, info = load_for_eval(str(smollm2), task, dtype, device)
            assert loaded.device.type == device and info["device"] == device
            runs.append(score(task, loaded, docs))
        exact, cpu, on_gpu = runs
        if "generations" in exact:
            agree = [i for i, (a, b) in enumerate(zip(exact["generations"], cpu["generations"], strict=True)) if a == b]
            assert len(agree) >= len(docs) // 2, task.task
            assert [on_gpu["generations"][i] for i in agree] == [cpu["generations"][i] for i in agree], task.task
            continue
        want, got_cpu, got_gpu = (torch.tensor(r["loglikelihoods"], dtype=torch.float64).flatten() for r in runs)
        scale = float(want.abs().max())
        cpu_error, gpu_error = float((got_cpu - want).abs().max()), float((got_gpu - want).abs().max())
        assert gpu_error <= 10 * cpu_error + 64 * FP32_UNIT * scale, (task.task, gpu_error, cpu_error)


@gpu
@pytest.mark.slow
def test_eval_runs_on_the_gpu_in_bf16_and_from_the_cli(smollm2, bbc, monkeypatch):
    monkeypatch.setenv("BBC_DATA", str(bbc))
    report = run_eval([str(smollm2)], [TASKS / "bbc_topic.yaml"], limit=8, dtype="bf16", device="cuda")
    assert report["models"][str(smollm2)]["device"] == "cuda"
    assert 0.0 <= report["results"][str(smollm2)]["bbc_topic"]["acc"] <= 1.0
    code, out = cli("eval", smollm2, "--task", TASKS / "bbc_topic.yaml", "--limit", 4, "--device", "cuda:0")
    assert code == 0 and "| bbc_topic | acc |" in out, out
