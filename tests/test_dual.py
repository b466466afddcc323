"""The dual (DMC-LoRA) method: exact init, importance EMAs, orthogonality loss, k schedule, screening,
reactivation, resume, fuse and PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    PROMPT,
    RESPONSE,
    assert_adapted_equals_base,
    assert_same_function,
    assert_same_tensors,
    cli,
    max_abs,
    outputs,
    sum_tolerance,
)
from test_train import Interrupt

from lrsurgery.data.examples import DataSpec
from lrsurgery.errors import ArtifactError
from lrsurgery.layers.adapted import adapted_layers
from lrsurgery.layers.adapter_file import ADAPTER_FILE, read_adapters
from lrsurgery.methods import HookContext, MethodError, get_method
from lrsurgery.methods.dual.screening import k_at, orthogonality_penalty, top_k_mask
from lrsurgery.methods.importance import ImportanceEMA, triplet_scores
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train

SCHEDULE = {"delta_t": 2, "t1": 0.2, "t2": 0.6, "k_final": 2}  # for 10-12 step runs: screening is visible


def _data(path, seq_len=48):
    return DataSpec(path=str(path), prompt_template=PROMPT, response_template=RESPONSE, seq_len=seq_len)


def _ema_and_reference(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """ImportanceEMA's scores and Eq. 13 triplet scores after 5 updates, and the same by a plain loop."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, generator=gen).to(dtype).requires_grad_(True)
    b = torch.randn(5, 3, generator=gen).to(dtype).requires_grad_(True)
    e = torch.randn(3, generator=gen).to(dtype).requires_grad_(True)
    ema = ImportanceEMA([a, b, e], beta1=0.85, beta2=0.7)
    ref_s = [torch.zeros_like(p) for p in (a, b, e)]
    ref_u = [torch.zeros_like(p) for p in (a, b, e)]
    for _ in range(5):
        for p in (a, b, e):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        ema.update()
        for i, p in enumerate((a, b, e)):
            s = (p.detach() * p.grad).abs()
            ref_s[i] = 0.85 * ref_s[i] + (1 - 0.85) * s
            ref_u[i] = 0.7 * ref_u[i] + (1 - 0.7) * (s - ref_s[i]).abs()
    imp = [s * u for s, u in zip(ref_s, ref_u, strict=True)]
    want = imp[2] + imp[1].mean(dim=0) + imp[0].mean(dim=1)  # Eq. 13
    got = triplet_scores([imp[0]], [imp[1]], [imp[2]])[0]
    return torch.cat([t.flatten() for t in ema.scores()]), torch.cat([t.flatten() for t in imp]), got, want


def test_importance_ema_matches_plain_reference():
    """The same recurrences (the tracker's foreach lerp against a plain loop): exact in fp64, and in fp32
    within the two's own rounding (|s − s̄| can cancel, so no fixed relative tolerance would hold)."""
    (scores32, imp32, got32, want32), (scores64, imp64, got64, want64) = (
        _ema_and_reference(dtype) for dtype in (torch.float32, torch.float64)
    )
    assert_same_function(scores32, scores64, imp32, imp64, "importance EMAs")
    assert_same_function(got32, got64, want32, want64, "triplet scores")


def test_triplet_scores_group_mixed_shapes():
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (4, 9), (4, 6)]
    imp_a = [torch.rand(s, generator=gen) for s in shapes]
    imp_b = [torch.rand(d, 4, generator=gen) for d in (5, 5, 8)]
    imp_e = [torch.rand(4, generator=gen) for _ in shapes]
    got = triplet_scores(imp_a, imp_b, imp_e)
    for i in range(3):
        torch.testing.assert_close(got[i], imp_e[i] + imp_b[i].mean(0) + imp_a[i].mean(1))


def test_orthogonality_loss_and_gradient_match_autograd_on_the_formula():
    gen = torch.Generator().manual_seed(2)
    a_list = [torch.randn(r, d, generator=gen, requires_grad=True) for r, d in ((3, 8), (3, 8), (3, 5))]
    b_list = [torch.randn(d, r, generator=gen, requires_grad=True) for d, r in ((6, 3), (4, 3), (6, 3))]
    got, grads_a, grads_b = orthogonality_penalty(a_list, b_list)
    got_grads = grads_a + grads_b
    eye = torch.eye(3)
    want = sum(
        torch.sqrt(((b.T @ b - eye) ** 2).sum()) + torch.sqrt(((a @ a.T - eye) ** 2).sum())
        for a, b in zip(a_list, b_list, strict=True)
    )
    want_grads = torch.autograd.grad(want, a_list + b_list)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    # exactly at the minimum (orthonormal rows / columns) the penalty and its gradient are 0, not NaN
    zero, ga, gb = orthogonality_penalty([torch.eye(3, 8)], [torch.eye(8, 3)])
    assert float(zero) == 0 and not ga[0].any() and not gb[0].any()


def test_k_schedule_phase_boundaries():
    total, r, kf = 100, 8, 4  # T1 = 15, T2 = 50
    k = [k_at(t, total, r, kf, 0.15, 0.5) for t in range(total + 1)]
    assert k[0] == k[14] == r  # k_init before T1
    assert k[15] == r  # the decay starts at k_init (Eq. 16 at t = t1)
    assert k[16] <= r and k[49] == kf + round((r - kf) * (1 / 35) ** 2)
    assert k[50] == k[99] == k[100] == kf  # final phase
    assert all(x >= y for x, y in zip(k, k[1:], strict=False))  # never increases
    assert k_at(30, total, r, kf, 0.1, 0.5) == kf + (r - kf) * 0.25  # half way from T1 = 10 to T2 = 50


def test_top_k_mask_keeps_exactly_k_per_row():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 1.0, 1.0, 0.0]])
    mask = top_k_mask(scores, 2)
    assert mask.tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    assert top_k_mask(scores, 4).eq(1).all()


def _dual_init(model, tmp_path, **options):
    opts = {"r_share": 2, "r_expert": 4, "alpha": None, **options}
    return run_init(str(model), "dual", tmp_path / "init", opts, overwrite=True)


def _hooks_on(model_folder, tmp_path, total=20, **train_options):
    init = _dual_init(model_folder, tmp_path)
    loaded, manifest = load_adapted(init)
    cfg = get_method("dual", **{**manifest.config["options"], **SCHEDULE, **train_options})
    hooks = cfg.hooks()
    hooks.setup(HookContext(loaded.model, None, None, None, total))
    return loaded, hooks


def _after_step(hooks, model, t):
    """The hooks' `after_step` once t optimizer steps are done."""
    return hooks.after_step(HookContext(model, None, None, None, hooks.total, step=t - 1))


def _set_scores(hooks, scores: torch.Tensor) -> None:
    """Make the triplet scores equal `scores` (M, r): all of it on I(E) (S̄ = scores, Ū = 1), none on A, B."""
    m = len(hooks.names)
    for i in range(2 * m):
        hooks.importance.sbar[i].zero_()
    for i, row in enumerate(scores):
        hooks.importance.sbar[2 * m + i].copy_(row)
        hooks.importance.ubar[2 * m + i].fill_(1.0)


def test_straight_through_masking_keeps_e_and_a_rising_expert_comes_back(tiny_llama, tmp_path):
    loaded, hooks = _hooks_on(tiny_llama, tmp_path, total=20, masking="straight-through")  # T1 = 4, T2 = 12
    layers = [adapted_layers(loaded.model)[n] for n in hooks.names]
    with torch.no_grad():
        for layer in layers:
            layer.expert_E.copy_(torch.randn(4) + 3)  # non-zero gates, so counting non-zeros counts the mask
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(len(layers), 4, generator=gen)
    _set_scores(hooks, scores)
    t = 8
    k = hooks.k(t)
    assert k == 3
    logged = _after_step(hooks, loaded.model, t)
    assert logged["expert_screened"] and logged["expert_active"] == k * len(layers)
    for layer, row in zip(layers, scores, strict=True):
        gate = layer.expert_gate().detach()
        assert int((gate != 0).sum()) == k
        assert gate[row.argmin()] == 0  # the lowest-scoring expert is the one masked
    # the masked expert adds exactly 0 to the output while its E keeps its value and still gets a gradient
    layer, low = layers[0], int(scores[0].argmin())
    x = torch.randn(2, 5, layer.base.in_features)
    layer.eval()
    y = layer(x)
    y.sum().backward()
    assert layer.expert_E.grad[low] != 0 and layer.expert_E[low] != 0
    with torch.no_grad():
        kept = layer.expert_E.clone()
        layer.expert_E[low] = 0
        assert torch.equal(layer(x), y)
        layer.expert_E.copy_(kept)
    # its score rises above the others: the next screening switches it back on
    scores[0, low] = 10.0
    _set_scores(hooks, scores)
    _after_step(hooks, loaded.model, 10)
    assert layers[0].expert_mask[low] == 1 and int(layers[0].expert_mask.sum()) == hooks.k(10)
    # after T2 the masks no longer change, whatever the scores do
    _after_step(hooks, loaded.model, 12)
    frozen = hooks.masks.clone()
    _set_scores(hooks, torch.rand(len(layers), 4, generator=gen))
    for t in range(13, 21):
        assert "expert_screened" not in _after_step(hooks, loaded.model, t)
    assert torch.equal(hooks.masks, frozen) and int(frozen.sum(1).unique()) == 2


def _true_gate_gradient(layer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """∂(Σ y)/∂E of the expert term s·B_e diag(E) A_e x written out in `dtype` (the gradient without a mask)."""
    e = layer.expert_E.detach().to(dtype).requires_grad_(True)
    a, b = layer.expert_A.detach().to(dtype), layer.expert_B.detach().to(dtype)
    scale = layer.branches[-1].scale
    (scale * ((x.to(dtype) @ a.T) * e) @ b.T).sum().backward()
    return e.grad


def test_zero_masking_sets_e_to_zero_and_keeps_its_true_gradient(tiny_llama, tmp_path):
    """Eq. 17: a switched-off expert's E_i is 0 right after screening, the forward is not masked, so its
    next gradient is the true ∂L/∂E_i, its instantaneous sensitivity |E_i·∂L/∂E_i| is 0, it regrows
    between screenings, is re-zeroed after every step of the final phase, and the artifact's masks take
    the final choice at the last step."""
    loaded, hooks = _hooks_on(tiny_llama, tmp_path, total=20)  # masking zero is the default
    assert hooks.cfg.masking == "zero"
    layers = [adapted_layers(loaded.model)[n] for n in hooks.names]
    with torch.no_grad():
        for layer in layers:
            layer.expert_E.copy_(torch.randn(4) + 3)
    before = [layer.expert_E.detach().clone() for layer in layers]
    scores = torch.rand(len(layers), 4, generator=torch.Generator().manual_seed(0))
    _set_scores(hooks, scores)
    assert _after_step(hooks, loaded.model, 8)["expert_screened"]  # k = 3
    for layer, row, old in zip(layers, scores, before, strict=True):
        low = int(row.argmin())
        assert layer.expert_E[low] == 0 and int((layer.expert_E != 0).sum()) == 3
        kept = torch.arange(4) != low
        assert torch.equal(layer.expert_E[kept], old[kept])  # the others keep their values
        assert layer.expert_mask.eq(1).all()  # no mask in the forward during training
    layer, low = layers[0], int(scores[0].argmin())
    layer.eval()
    x = torch.randn(2, 5, layer.base.in_features)
    layer.zero_grad()
    layer(x).sum().backward()
    want64 = _true_gate_gradient(layer, x, torch.float64)
    assert want64[low] != 0 and float((layer.expert_E[low] * layer.expert_E.grad[low]).detach().abs()) == 0
    # the layer's gradient against the formula, each in fp32 and fp64: tolerances from their own rounding
    layer64 = copy.deepcopy(layer).double()
    layer64(x.double()).sum().backward()
    got32, got64 = layer.expert_E.grad, layer64.expert_E.grad
    assert_same_function(got32, got64, _true_gate_gradient(layer, x, torch.float32), want64, "gate gradient")
    # regrowth between screenings is kept; from T2 on a switched-off E_i is zeroed after every step
    with torch.no_grad():
        layer.expert_E[low] = 0.5
    _after_step(hooks, loaded.model, 9)
    assert layer.expert_E[low] == 0.5
    _after_step(hooks, loaded.model, 12)  # T2: the last screening (k_final = 2), then frozen
    off = hooks.masks == 0
    for t in range(13, 21):
        with torch.no_grad():
            for layer_, row in zip(layers, off, strict=True):
                layer_.expert_E[row] = 0.25  # what an optimizer step could have done
        _after_step(hooks, loaded.model, t)
        assert all(not layer_.expert_E[row].any() for layer_, row in zip(layers, off, strict=True))
        assert all(layer_.expert_mask.eq(1).all() for layer_ in layers) == (t < 20)
    assert torch.equal(torch.stack([layer_.expert_mask for layer_ in layers]), hooks.masks)


def test_orthogonality_weight_is_gamma_on_the_mean_over_all_factors(tiny_llama, tmp_path):
    """Eq. 15 with AdaLoRA's convention: γ times the mean of the 2M norms ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F."""
    loaded, hooks = _hooks_on(tiny_llama, tmp_path, orth_weight=0.3)
    with torch.no_grad():
        for a in hooks.a:
            a.mul_(1.5)  # off the minimum, so the penalty is not 0
    with torch.no_grad():
        norms = [torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])) for a in hooks.a]
        norms += [torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1])) for b in hooks.b]
    assert len(norms) == 2 * len(hooks.names)
    logged = hooks.add_gradients(HookContext(loaded.model, None, None, None, hooks.total))
    want = 0.3 * float(torch.stack(norms).double().mean())
    # the mean of 2M non-negative norms (no cancellation: 8√n·u bounds that sum's rounding), each norm an fp32
    # reduction over ≤ d² Gram entries of factors scaled 1.5, so far from I (relative rounding a few u·√d²,
    # d ≤ 64 here): the ×10 covers those inner reductions on any machine
    assert abs(logged["orth_loss"] - want) <= sum_tolerance(len(norms)) * want * 10


def test_bad_options_are_one_line_errors(tiny_llama, tmp_path):
    with pytest.raises(MethodError, match="r_share \\+ r_expert can be at most 32"):
        _dual_init(tiny_llama, tmp_path, r_share=16, r_expert=20)
    cases = [
        ({"k_final": 5}, "--k-final must be between 1 and --r-expert \\(4\\)"),
        ({"t1": 0.5, "t2": 0.5}, "0 ≤ t1 < t2 ≤ 1"),
        ({"r_expert": None}, "needs --r-share and --r-expert"),
        ({"ablation": "none"}, "--ablation must be one of"),
        ({"beta1": 1.0}, "--beta1 must be in"),
        ({"masking": "soft"}, "--masking must be one of"),
    ]
    for extra, message in cases:
        with pytest.raises(MethodError, match=message):
            get_method("dual", **{"r_share": 2, "r_expert": 4, **extra})
    code, out = cli(
        "init", tiny_llama, "--method", "dual", "--r-share", "2", "--r-expert", "4", "--rank", "4", "-o", tmp_path / "x"
    )
    assert code == 1 and "not --rank" in out
    init = run_init(str(tiny_llama), "lora", tmp_path / "lora", {"rank": 2})
    with pytest.raises(MethodError, match="does not take --k-final"):
        run_train(
            init,
            _data(tmp_path / "none.jsonl"),
            TrainConfig(max_steps=1),
            tmp_path / "r",
            method_options={"k_final": 2},
        )


def test_trainable_count_includes_both_branches_and_gate(tiny_llama, tmp_path):
    init = _dual_init(tiny_llama, tmp_path)
    manifest = json.loads((init / "manifest.json").read_text())
    loaded, _ = load_adapted(init)
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert manifest["extra"]["trainable_parameters"] == trainable
    assert manifest["extra"]["method"]["expert_init"].startswith("A_e orthonormal rows")


def test_resumed_dual_run_equals_uninterrupted(tiny_llama, bbc_small, tmp_path):
    init = _dual_init(tiny_llama, tmp_path, expert_dropout=0.1)
    cfg = TrainConfig(max_steps=10, save_every=3, lr=5e-3, batch_size=2)
    data = _data(bbc_small)
    whole = run_train(init, data, cfg, tmp_path / "whole", method_options=SCHEDULE)
    with pytest.raises(KeyboardInterrupt):
        run_train(init, data, cfg, tmp_path / "resumed", hooks=[Interrupt(5)], method_options=SCHEDULE)
    with pytest.raises(ArtifactError, match=r"different settings \(method_options.k_final\)"):
        run_train(init, data, cfg, tmp_path / "resumed", resume=True, method_options={**SCHEDULE, "k_final": 3})
    resumed = run_train(init, data, cfg, tmp_path / "resumed", resume=True, method_options=SCHEDULE)
    assert_same_tensors(whole / ADAPTER_FILE, resumed / ADAPTER_FILE)
    log_a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    drop = ("step_time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_a] == [
        {k: v for k, v in r.items() if k not in drop} for r in log_b
    ]
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["config"]["method_train_options"] == SCHEDULE
    assert manifest["extra"]["dual"]["k_schedule"] == [[2, 4], [4, 3], [6, 2]]
    assert manifest["extra"]["dual"] == json.loads((resumed / "manifest.json").read_text())["extra"]["dual"]
    assert log_a[-1]["expert_masks"] == manifest["extra"]["dual"]["active_experts"]
    assert "orth_loss" in log_a[0] and [r["expert_k"] for r in log_a][:7] == [4, 4, 3, 3, 2, 2, 2]
    _, adapters, _ = read_adapters(whole)
    for spec in adapters.values():  # the artifact's gates: exactly k_final live experts per module
        assert int((spec.expert.gate() != 0).sum()) == 2


@pytest.mark.slow
def test_dual_init_leaves_smollm2_output_unchanged(smollm2, tmp_path):
    init = _dual_init(smollm2, tmp_path, r_share=4, r_expert=4)
    layers = adapted_layers(load_adapted(init)[0].model)
    assert len(layers) == 210 and all(layer.lora_B.abs().max() > 0 for layer in layers.values())
    assert_adapted_equals_base(init, smollm2)


@pytest.mark.slow
def test_fuse_and_peft_export_of_a_dual_run_equal_the_adapted_model(smollm2, bbc_small, tmp_path):
    from test_export import assert_peft_export_is_exact
    from test_fuse import assert_fuse_is_exact
    from transformers import AutoModelForCausalLM

    init = _dual_init(smollm2, tmp_path, r_share=4, r_expert=4)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=5e-3, warmup_ratio=0.0)
    run = run_train(init, _data(bbc_small), cfg, tmp_path / "run", method_options={**SCHEDULE, "t1": 0.25})
    adapted, _ = load_adapted(run)
    masks = torch.stack([layer.expert_mask for layer in adapted_layers(adapted.model).values()])
    assert int(masks.sum(1).unique()) == 2  # screened: the gates really are masked
    expected = outputs(adapted.model, adapted.tokenizer)
    plain = outputs(AutoModelForCausalLM.from_pretrained(smollm2), adapted.tokenizer)
    assert max_abs(expected, plain) > 1e-2
    assert_fuse_is_exact(run, tmp_path, AutoModelForCausalLM)
    assert_peft_export_is_exact(run, tmp_path, AutoModelForCausalLM, smollm2)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {4 + 4 + 4}  # edit + shared + expert
