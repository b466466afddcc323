"""The fused low-rank branch op against plain autograd on the formula it computes."""

from __future__ import annotations

import pytest
import torch

from lrsurgery.layers.branches import BranchPlan, add_branches, linear_with_branches

T, D_IN, D_OUT = 24, 10, 7


def _branch(rank: int, gated: bool, masked: bool, gen: torch.Generator, dtype=torch.float64) -> list:
    a = torch.randn(rank, D_IN, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(D_OUT, rank, generator=gen, dtype=dtype).requires_grad_()
    e = torch.randn(rank, generator=gen, dtype=dtype).requires_grad_() if gated else None
    mask = None
    if masked:
        mask = torch.ones(rank, dtype=dtype)
        mask[0] = 0
    return [a, b, e, mask]


def _reference(out, x, plans, factors, keeps):
    """out + Σ s·((x ⊙ keep) Aᵀ ⊙ (E ⊙ mask)) Bᵀ with a straight-through mask, by plain autograd."""
    y = out
    for k, plan in enumerate(plans):
        a, b, e, mask = factors[4 * k : 4 * k + 4]
        h = (x if keeps[k] is None else x * keeps[k]) @ a.T
        if e is not None:
            gate = e if mask is None else e + (e * mask - e).detach()  # value E ⊙ mask, gradient to all of E
            h = h * gate
        y = y + plan.scale * h @ b.T
    return y


def _keeps(plans, x, seed):
    """The keep-masks the op draws from the generator state `seed`, in branch order."""
    torch.manual_seed(seed)
    out = []
    for plan in plans:
        if plan.dropout > 0:
            out.append(torch.empty_like(x).bernoulli_(1 - plan.dropout).div_(1 - plan.dropout))
        else:
            out.append(None)
    return out


CASES = {
    "lora with dropout": ([BranchPlan(0.5, 0.3)], [(4, False, False)], ()),
    "pissa, no dropout": ([BranchPlan(1.0, 0.0)], [(3, False, False)], ()),
    "gated main branch": ([BranchPlan(2.0, 0.0)], [(3, True, False)], ()),
    "frozen A (tlora)": ([BranchPlan(0.25, 0.2)], [(3, False, False)], (0,)),
    "dual: shared + masked gated expert": (
        [BranchPlan(0.5, 0.0), BranchPlan(0.5, 0.25)],
        [(3, False, False), (4, True, True)],
        (),
    ),
    "two dropout branches": ([BranchPlan(1.0, 0.1), BranchPlan(0.5, 0.4)], [(2, False, False), (3, True, True)], ()),
}


@pytest.mark.parametrize("mode", ["outside", "in place", "base inside"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_equal_plain_autograd(case, mode):
    """The three ways in: a base output given (added to a copy, or in place into it), or the frozen base
    product run inside the op (x·Wᵀ + bias); x of shape (2, T/2, d_in), as a layer sees a batch."""
    plans, shapes, frozen_a = CASES[case]
    gen = torch.Generator().manual_seed(1)
    factors = [t for shape in shapes for t in _branch(*shape, gen)]
    for k in frozen_a:
        factors[4 * k].requires_grad_(False)
    out = torch.randn(2, T // 2, D_OUT, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    bias = torch.randn(D_OUT, generator=gen, dtype=torch.float64)
    x = torch.randn(2, T // 2, D_IN, generator=gen, dtype=torch.float64).requires_grad_()
    grad_y = torch.randn(2, T // 2, D_OUT, generator=gen, dtype=torch.float64)
    trainable = (
        ([] if mode == "base inside" else [out]) + [x] + [t for t in factors if t is not None and t.requires_grad]
    )

    torch.manual_seed(7)
    if mode == "base inside":
        y = linear_with_branches(x, weight, bias, tuple(plans), tuple(factors), training=True)
    else:
        base_out = out * 1  # a layer's fresh output, as AdaptedLinear passes it; ∂L/∂out reaches the leaf through it
        y = add_branches(base_out, x, tuple(plans), tuple(factors), training=True, in_place=mode == "in place")
        assert (y.data_ptr() == base_out.data_ptr()) == (mode == "in place")  # in place: written into base_out
    got = torch.autograd.grad(y, trainable, grad_y)
    keeps = _keeps(plans, x, 7)
    if any(p.dropout > 0 for p in plans):
        assert any(bool((k == 0).any()) for k in keeps if k is not None)  # some inputs really are dropped
    want_y = _reference(
        torch.nn.functional.linear(x, weight, bias) if mode == "base inside" else out, x, plans, factors, keeps
    )
    want = torch.autograd.grad(want_y, trainable, grad_y)

    # fp64 on O(1) values with sums of ≤ a few hundred terms: rounding ≲ 1e-14, on any machine
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for k in frozen_a:
        assert factors[4 * k].grad is None


def test_in_place_and_base_inside_refuse_what_they_cannot_do():
    gen = torch.Generator().manual_seed(6)
    factors = tuple(_branch(3, False, False, gen))
    x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64)
    leaf = torch.randn(T, D_OUT, dtype=torch.float64).requires_grad_()
    with pytest.raises(ValueError, match="in_place"):
        add_branches(leaf, x, (BranchPlan(1.0, 0.0),), factors, training=False, in_place=True)
    weight = torch.randn(D_OUT, D_IN, dtype=torch.float64).requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        linear_with_branches(x, weight, None, (BranchPlan(1.0, 0.0),), factors, training=False)


def test_eval_mode_draws_no_dropout_and_gradcheck_passes():
    gen = torch.Generator().manual_seed(2)
    plans = (BranchPlan(0.5, 0.0), BranchPlan(0.75, 0.5))
    factors = _branch(3, False, False, gen) + _branch(2, True, False, gen)  # no mask: straight-through is no derivative
    out = torch.randn(T, D_OUT, generator=gen, dtype=torch.float64).requires_grad_()
    x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64).requires_grad_()
    state = torch.get_rng_state()
    y = add_branches(out, x, plans, tuple(factors), training=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(y, _reference(out, x, plans, factors, [None, None]), rtol=1e-12, atol=1e-12)
    inputs = [out, x] + [t for t in factors if t is not None and t.requires_grad]

    def fn(*args):
        it = iter(args[2:])
        rebuilt = tuple(next(it) if t is not None and t.requires_grad else t for t in factors)
        return add_branches(args[0], args[1], plans, rebuilt, training=False)

    assert torch.autograd.gradcheck(fn, inputs)


def test_a_masked_gate_adds_nothing_but_its_e_still_gets_the_gate_gradient():
    gen = torch.Generator().manual_seed(3)
    a, b, e, mask = _branch(4, True, True, gen)
    x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64)
    out = torch.zeros(T, D_OUT, dtype=torch.float64)
    y = add_branches(out, x, (BranchPlan(1.0, 0.0),), (a, b, e, mask), training=False)
    y.sum().backward()
    without = add_branches(out, x, (BranchPlan(1.0, 0.0),), (a[1:], b[:, 1:], e[1:], None), training=False)
    torch.testing.assert_close(y, without, rtol=1e-12, atol=1e-12)  # entry 0 is masked: it adds exactly 0
    h = x @ a.detach().T
    expected = (h[:, 0] * (torch.ones(T, D_OUT, dtype=torch.float64) @ b.detach()[:, 0])).sum()
    torch.testing.assert_close(e.grad[0], expected)  # ∂L/∂gate_0, as if it were switched on


@pytest.mark.parametrize("base_inside", [False, True])
def test_bf16_autocast_runs_in_bf16_and_returns_fp32_gradients(base_inside):
    gen = torch.Generator().manual_seed(4)
    plans = (BranchPlan(0.5, 0.0), BranchPlan(0.5, 0.1))
    factors = _branch(4, False, False, gen, torch.float32) + _branch(4, True, True, gen, torch.float32)
    base = torch.nn.Linear(D_IN, D_OUT).requires_grad_(False)
    x = torch.randn(T, D_IN, generator=gen).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if base_inside:
            y = linear_with_branches(x, base.weight, base.bias, plans, tuple(factors), training=True)
        else:
            y = add_branches(base(x), x, plans, tuple(factors), training=True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for t in [x] + [t for t in factors if t is not None and t.requires_grad]:
        assert t.grad is not None and t.grad.dtype == torch.float32 and bool(torch.isfinite(t.grad).all())


def test_only_b_trains_when_a_is_frozen_and_x_needs_no_gradient():
    gen = torch.Generator().manual_seed(5)
    plans = (BranchPlan(0.5, 0.2),)
    factors = _branch(3, False, False, gen)
    factors[0].requires_grad_(False)
    out = torch.randn(T, D_OUT, generator=gen, dtype=torch.float64)
    x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64)  # e.g. the first block's input
    grad_y = torch.randn(T, D_OUT, generator=gen, dtype=torch.float64)
    torch.manual_seed(9)
    (got,) = torch.autograd.grad(add_branches(out, x, plans, tuple(factors), training=True), [factors[1]], grad_y)
    (want,) = torch.autograd.grad(_reference(out, x, plans, factors, _keeps(plans, x, 9)), [factors[1]], grad_y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
