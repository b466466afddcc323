"""Flat parameter buffers: same training as separate tensors, guarded gradients, same checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_function
from torch import nn

from lrsurgery.training.checkpoint import load_checkpoint, save_checkpoint
from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.schedule import adamw

DTYPES = (torch.float32, torch.float64)  # each comparison runs in both: fp64 shows the maths is the same


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # a frozen tensor stays out of the buffers
    model.gate = nn.Parameter(torch.randn(3))  # a tiny tensor, like a dual gate
    return model.to(dtype)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step)).to(model.gate.dtype)
    return (model[3](model[2](model[1](model[0](x))) * model.gate) ** 2).mean()


def _values(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _trained_pair(dtype: torch.dtype, clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every parameter after 5 steps, trained as separate tensors and from flat buffers."""
    plain, flat_model = _model(dtype=dtype), _model(dtype=dtype)
    flat = FlatParameters([p for p in flat_model.parameters() if p.requires_grad])
    assert len(flat.flats) == 1 and flat.flats[0].numel() == 7 * 5 + 5 * 3 + 3 * 2 + 2 + 3
    _train(plain, 5, None, clip)
    _train(flat_model, 5, flat, clip)
    assert torch.equal(plain[0].bias, _model(dtype=dtype)[0].bias)  # frozen, untouched
    return _values(plain), _values(flat_model)


def _train(model: nn.Module, steps: int, flat: FlatParameters | None, clip: float | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(flat.flats if flat else params, lr=1e-2)
    for step in range(steps):
        for micro in range(2):  # gradient accumulation over two backward passes
            (_loss(model, 2 * step + micro) / 2).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(flat.flats if flat else params, clip)
        optimizer.step()
        if flat:
            flat.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("clip", [None, 0.05])
def test_flat_training_equals_separate_tensors(clip):
    """The same elementwise AdamW (and clipping, whose norm sums in another order): the fused kernel's
    vector/scalar split falls elsewhere in one buffer, so fp32 runs differ by their own rounding only."""
    (plain32, flat32), (plain64, flat64) = (_trained_pair(dtype, clip) for dtype in DTYPES)
    assert_same_function(flat32, flat64, plain32, plain64, "flat vs separate training")


def test_a_gradient_cut_loose_from_the_buffer_is_caught():
    model = _model()
    flat = FlatParameters([p for p in model.parameters() if p.requires_grad])
    _loss(model, 0).backward()
    flat.check()
    model.zero_grad()  # set_to_none=True: the next backward would fill fresh tensors the optimizer never sees
    with pytest.raises(RuntimeError, match="replaced"):
        flat.check()


def _checkpoints_and_resume(folder, dtype):
    """Checkpoints of the same 3 steps with and without flat buffers, and the plain run continued for 2
    steps beside its checkpoint resumed under flat buffers (each tensor of both, and the final values)."""
    plain, flat_model = _model(dtype=dtype), _model(dtype=dtype)
    flat = FlatParameters([p for p in flat_model.parameters() if p.requires_grad])
    opt_plain, opt_flat = _train(plain, 3, None), _train(flat_model, 3, flat)
    named_plain = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    named_flat = {n: p for n, p in flat_model.named_parameters() if p.requires_grad}
    save_checkpoint(folder / "plain", 3, named_plain, opt_plain)
    save_checkpoint(folder / "flat", 3, named_flat, opt_flat, flat=flat)
    from lrsurgery.io.artifacts import load_tensors

    a, b = load_tensors(folder / "plain" / "state.safetensors"), load_tensors(folder / "flat" / "state.safetensors")
    assert sorted(a) == sorted(b) and any(k.endswith("exp_avg_sq") for k in a)

    # a plain checkpoint resumed with flat buffers continues as the plain run does
    resumed = _model(dtype=dtype)  # the frozen bias is not in a checkpoint; the trained tensors come from the file
    resumed_flat = FlatParameters([p for p in resumed.parameters() if p.requires_grad])
    optimizer = adamw(resumed_flat.flats, lr=1e-2)
    named = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert load_checkpoint(folder / "plain", named, optimizer, resumed_flat) == 3
    resumed_flat.check()
    for model, opt, fl in ((plain, opt_plain, None), (resumed, optimizer, resumed_flat)):
        for step in range(3, 5):
            _loss(model, step).backward()
            opt.step()
            fl.zero_grad() if fl else opt.zero_grad(set_to_none=True)
    return a, b, _values(plain), _values(resumed)


def test_checkpoint_is_the_same_with_or_without_flat_buffers_and_resumes_either_way(tmp_path):
    runs = {dtype: _checkpoints_and_resume(tmp_path / str(dtype), dtype) for dtype in DTYPES}
    (a32, b32, plain32, resumed32), (a64, b64, plain64, resumed64) = runs.values()
    for key in a32:
        if not key.startswith("rng."):  # each tensor on its own scale (parameters, moments, step count)
            assert_same_function(b32[key], b64[key], a32[key], a64[key], key)
    assert_same_function(resumed32, resumed64, plain32, plain64, "resumed under flat buffers")
