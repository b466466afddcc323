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


def _loss_logits_grads(init, dtype: torch.dtype, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
        (dtype, compiled): _loss_logits_grads(init, dtype, compiled)
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
