"""Flat parameter buffers: same training as separate tensors, guarded gradients, same checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrsurgery.checkpoint import load_checkpoint, save_checkpoint
from lrsurgery.flat import FlatParameters
from lrsurgery.train import adamw


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # a frozen tensor stays out of the buffers
    model.gate = nn.Parameter(torch.randn(3))  # a tiny tensor, like a dual gate
    return model


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step))
    return (model[3](model[2](model[1](model[0](x))) * model.gate) ** 2).mean()


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


def test_flat_training_equals_separate_tensors():
    plain, flat_model = _model(), _model()
    flat = FlatParameters([p for p in flat_model.parameters() if p.requires_grad])
    assert len(flat.flats) == 1 and flat.flats[0].numel() == 7 * 5 + 5 * 3 + 3 * 2 + 2 + 3
    _train(plain, 5, None)
    _train(flat_model, 5, flat)
    for (name, a), b in zip(plain.named_parameters(), flat_model.parameters(), strict=True):
        # the same elementwise AdamW; the fused kernel's vector/scalar split falls elsewhere in one buffer
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(plain[0].bias, _model()[0].bias)  # frozen, untouched


def test_flat_clipping_matches_per_tensor_clipping():
    plain, flat_model = _model(), _model()
    flat = FlatParameters([p for p in flat_model.parameters() if p.requires_grad])
    _train(plain, 5, None, clip=0.05)
    _train(flat_model, 5, flat, clip=0.05)
    for a, b in zip(plain.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the norm sums in another order


def test_a_gradient_cut_loose_from_the_buffer_is_caught():
    model = _model()
    flat = FlatParameters([p for p in model.parameters() if p.requires_grad])
    _loss(model, 0).backward()
    flat.check()
    model.zero_grad()  # set_to_none=True: the next backward would fill fresh tensors the optimizer never sees
    with pytest.raises(RuntimeError, match="replaced"):
        flat.check()


def test_checkpoint_is_the_same_with_or_without_flat_buffers_and_resumes_either_way(tmp_path):
    plain, flat_model = _model(), _model()
    flat = FlatParameters([p for p in flat_model.parameters() if p.requires_grad])
    opt_plain, opt_flat = _train(plain, 3, None), _train(flat_model, 3, flat)
    named_plain = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    named_flat = {n: p for n, p in flat_model.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path / "plain", 3, named_plain, opt_plain)
    save_checkpoint(tmp_path / "flat", 3, named_flat, opt_flat, flat=flat)
    from lrsurgery.artifacts import load_tensors

    a, b = load_tensors(tmp_path / "plain" / "state.safetensors"), load_tensors(tmp_path / "flat" / "state.safetensors")
    assert sorted(a) == sorted(b) and any(k.endswith("exp_avg_sq") for k in a)
    for key in a:
        if not key.startswith("rng."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)

    # a plain checkpoint resumed with flat buffers continues exactly as the plain run does
    resumed = _model()  # the frozen bias is not in a checkpoint; the trained tensors come from the file
    resumed_flat = FlatParameters([p for p in resumed.parameters() if p.requires_grad])
    optimizer = adamw(resumed_flat.flats, lr=1e-2)
    named = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert load_checkpoint(tmp_path / "plain", named, optimizer, resumed_flat) == 3
    resumed_flat.check()
    for model, opt, fl in ((plain, opt_plain, None), (resumed, optimizer, resumed_flat)):
        for step in range(3, 5):
            _loss(model, step).backward()
            opt.step()
            fl.zero_grad() if fl else opt.zero_grad(set_to_none=True)
    for a_p, b_p in zip(plain.parameters(), resumed.parameters(), strict=True):
        if a_p.requires_grad:
            torch.testing.assert_close(a_p, b_p, rtol=0, atol=1e-6)
