"""`train --compile`: compiled blocks compute the eager function and its gradients; a run trains with them
and resumes without them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPT, RESPONSE, assert_same_function
from test_train import Interrupt

from lrsurgery.data.examples import DataSpec
from lrsurgery.io.artifacts import load_tensors
from lrsurgery.layers.adapter_file import ADAPTER_FILE
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.init import run_init
from lrsurgery.training.compiled import prepare_training_forward
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train

pytestmark = pytest.mark.slow  # each compilation takes seconds


def _logits_and_grads(init, dtype: torch.dtype, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the adapters' gradients concatenated) of one training forward and backward."""
    model = load_adapted(init, dtype=dtype)[0].model
    assert prepare_training_forward(model, compiled, torch.device("cpu")) == (2 if compiled else 0)
    model.train()
    ids = torch.randint(100, 5000, (3, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return out.logits.detach(), grads


def test_compiled_blocks_compute_the_eager_function_and_gradients(tiny_llama, tmp_path):
    torch._dynamo.reset()
    init = run_init(str(tiny_llama), "pissa", tmp_path / "init", {"rank": 4})  # B ≠ 0: the branches count
    runs = {
        (dtype, compiled): _logits_and_grads(init, dtype, compiled)
        for dtype in (torch.float32, torch.float64)
        for compiled in (False, True)
    }
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was really compiled
    for i, what in enumerate(("logits", "adapter gradients")):
        assert_same_function(
            runs[torch.float32, True][i],
            runs[torch.float64, True][i],
            runs[torch.float32, False][i],
            runs[torch.float64, False][i],
            what,
        )


def test_train_with_compile_resumes_without_it(tiny_llama, bbc_small, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 4})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    compiled = TrainConfig(max_steps=4, save_every=2, lr=5e-3, compile=True)
    with pytest.raises(KeyboardInterrupt):
        run_train(init, data, compiled, tmp_path / "run", hooks=[Interrupt(3)])
    eager = TrainConfig(**{**compiled.__dict__, "compile": False})
    out = run_train(init, data, eager, tmp_path / "run", resume=True)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    trained, start = load_tensors(out / ADAPTER_FILE), load_tensors(init / ADAPTER_FILE)
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k.endswith("lora_B"))


METHODS = {  # each with a schedule that makes its mechanics (screening, switches) happen in 8 steps
    "lora": ({"rank": 4}, {}),
    "pissa": ({"rank": 4, "dropout": 0.1}, {}),
    "tlora": ({"rank": 4, "alpha": 8}, {}),
    "dual": ({"r_share": 2, "r_expert": 4, "alpha": None}, {"delta_t": 2, "t1": 0.2, "t2": 0.6, "k_final": 2}),
    "srlora": ({"rank": 2, "r_target": 6}, {"switch_interval": 2}),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_compiled(method, tiny_llama, bbc_small, tmp_path):
    from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate

    options, train_options = METHODS[method]
    if method == "tlora":
        cfg = CalibrateConfig(samples=4, seq_len=32, batch_size=2, collect="covariance,sensitivity")
        options = {
            **options,
            "stats": str(run_calibrate(str(tiny_llama), DataSpec(path=str(bbc_small)), cfg, tmp_path / "stats")),
        }
    init = run_init(str(tiny_llama), method, tmp_path / "init", options)
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    torch._dynamo.reset()  # compiled afresh, not reusing an earlier test's code
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    outs = {}
    for compiled in (False, True):
        cfg = TrainConfig(max_steps=8, batch_size=2, lr=5e-3, compile=compiled)
        outs[compiled] = run_train(init, data, cfg, tmp_path / f"run-{compiled}", method_options=train_options)
    # compiled, and not so often recompiled (a mask or a weight edit at each step) that dynamo gave up
    assert 0 < graphs["unique_graphs"] - before < torch._dynamo.config.recompile_limit
    eager, compiled = (load_tensors(outs[c] / ADAPTER_FILE) for c in (False, True))
    assert {k: v.shape for k, v in eager.items()} == {k: v.shape for k, v in compiled.items()}  # same switches
    logs = [(outs[c] / "metrics.jsonl").read_text().splitlines() for c in (False, True)]
    assert all(len(log) == 8 for log in logs)
