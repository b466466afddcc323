"""TLoRA: budgeted rank/alpha allocation, frozen task-aware A from W·C, output unchanged, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FP32_UNIT, PROMPT, RESPONSE, assert_adapted_equals_base, cli, max_abs, outputs, sum_tolerance

from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
from lrsurgery.calibration.stats_file import CovarianceReader, load_covariance, load_sensitivity
from lrsurgery.data.examples import DataSpec
from lrsurgery.errors import ArtifactError
from lrsurgery.hf.load import load_model
from lrsurgery.hf.tree import backbone, find_targets
from lrsurgery.io.artifacts import load_tensors, save_tensors
from lrsurgery.layers.adapter_file import read_adapters
from lrsurgery.linalg.eigen import psd_power
from lrsurgery.linalg.svd import subspace_distance
from lrsurgery.methods import MethodError, TrainHooks
from lrsurgery.methods.tlora.allocation import AllocationError, allocate_alphas, allocate_ranks
from lrsurgery.stages.init import init_groups, run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train

BOTH = ("covariance", "sensitivity")


def test_rank_allocation_matches_a_hand_computed_table():
    scores = {"a": 8.0, "b": 4.0, "c": 2.0, "d": 1.0, "e": 1.0}
    caps = dict.fromkeys(scores, 100)
    # budget 2 x 5 = 10; shares 10·S/16 = 5, 2.5, 1.25, .625, .625 → d, e raised to 1; the 8 left go
    # 8·(8, 4, 2)/14 = 4.571, 2.286, 1.143 → floors 4, 2, 1 and the missing rank to a (largest remainder)
    assert allocate_ranks(scores, 10, caps, min_rank=1) == {"a": 5, "b": 2, "c": 1, "d": 1, "e": 1}
    # a capped at 4: the 4 left for b, c go 4·(4, 2)/6 = 2.667, 1.333 → 2, 1, remainder to b
    assert allocate_ranks(scores, 10, {**caps, "a": 4}, min_rank=1) == {"a": 4, "b": 3, "c": 1, "d": 1, "e": 1}
    # min_rank 0: d and e can drop out; 10·S/16 = 5, 2.5, 1.25, .625, .625 → floors 5, 2, 1, 0, 0 and
    # the two missing ranks to the largest remainders (.625, .625; tie on score → name order: d, e)
    assert allocate_ranks(scores, 10, caps, min_rank=0) == {"a": 5, "b": 2, "c": 1, "d": 1, "e": 1}
    # budget 8: 4, 2, 1, .5, .5 → floors 4, 2, 1, 0, 0; the one missing rank breaks the d/e tie by name
    assert allocate_ranks(scores, 8, caps, min_rank=0) == {"a": 4, "b": 2, "c": 1, "d": 1, "e": 0}
    # Eq. 7: α_i = r_i · (α·5 / r_init) · S_i / ΣS with α = 16, r_init = 2
    alphas = allocate_alphas(scores, {"a": 5, "b": 2, "c": 1, "d": 1, "e": 1}, alpha=16, rank=2)
    assert alphas == pytest.approx({"a": 100.0, "b": 20.0, "c": 5.0, "d": 2.5, "e": 2.5})
    # released code: scale max(α, round(α_total·p_i)) / r_init = max(16, (40, 20, 10, 5, 5)) / 2
    # = 20, 10, 8, 8, 8; α_i = r_i · scale: no module's scale falls below α / r_init = 8
    ranks = {"a": 5, "b": 2, "c": 1, "d": 1, "e": 1}
    released = allocate_alphas(scores, ranks, alpha=16, rank=2, rule="released")
    assert released == pytest.approx({"a": 100.0, "b": 20.0, "c": 8.0, "d": 8.0, "e": 8.0})


def test_rank_allocation_refuses_impossible_budgets():
    scores = {"a": 1.0, "b": 1.0}
    with pytest.raises(AllocationError, match="cannot give each of 2 modules --min-rank 3"):
        allocate_ranks(scores, 5, {"a": 8, "b": 8}, min_rank=3)
    with pytest.raises(AllocationError, match="exceeds what the modules can hold"):
        allocate_ranks(scores, 17, {"a": 8, "b": 8})
    with pytest.raises(AllocationError, match="finite"):
        allocate_ranks({"a": float("nan"), "b": 1.0}, 4, {"a": 8, "b": 8})


@pytest.mark.parametrize("budget", [7, 30, 61, 160])
def test_rank_allocation_invariants(budget):
    generator = torch.Generator().manual_seed(budget)
    values = torch.rand(30, generator=generator).pow(3).tolist()
    scores = {f"m{i}": v for i, v in enumerate(values)}
    caps = {f"m{i}": 2 + i % 9 for i in range(30)}
    ranks = allocate_ranks(scores, budget, caps, min_rank=0 if budget < 30 else 1)
    assert sum(ranks.values()) == budget
    assert all(0 <= ranks[n] <= caps[n] for n in scores)
    free = [n for n in scores if 1 < ranks[n] < caps[n]]
    for a in free:  # among unbounded modules a higher score never gets a lower rank
        assert all(ranks[a] >= ranks[b] for b in free if scores[a] > scores[b])


@pytest.fixture(scope="module")
def tiny_stats(tiny_llama, bbc_small, tmp_path_factory):
    cfg = CalibrateConfig(samples=4, seq_len=32, batch_size=2, collect=BOTH)
    return run_calibrate(str(tiny_llama), DataSpec(path=str(bbc_small)), cfg, tmp_path_factory.mktemp("s") / "stats")


def _modules(init):
    return json.loads((init / "manifest.json").read_text())["extra"]


def test_tlora_init_allocates_freezes_a_and_records_ranks(tiny_llama, tiny_stats, tmp_path):
    init = run_init(str(tiny_llama), "tlora", tmp_path / "i", {"rank": 4, "alpha": 8, "stats": str(tiny_stats)})
    extra = _modules(init)
    ranks = {n: m["rank"] for n, m in extra["modules"].items()}
    assert sum(ranks.values()) == 4 * 14 and len(set(ranks.values())) > 1
    assert ranks == extra["method"]["ranks"]
    sens = load_sensitivity(tiny_stats)
    assert max(ranks, key=ranks.get) == max(sens, key=sens.get)
    share = {n: s / sum(sens.values()) for n, s in sens.items()}
    assert extra["method"]["alpha_rule"] == "released" and extra["method"]["a"]["covariance"] == "centered"
    for name, info in extra["modules"].items():
        scale = max(8, round(8 * 14 * share[name])) / 4  # the released code's max(α, round(α_total·p_i)) / r_init
        assert info["scale"] == pytest.approx(scale) and info["alpha"] == pytest.approx(scale * ranks[name])
        assert info["frozen"] == ["A"]
    paper = _modules(
        run_init(
            str(tiny_llama),
            "tlora",
            tmp_path / "p",
            {"rank": 4, "alpha": 8, "stats": str(tiny_stats), "alpha_rule": "paper"},
        )
    )
    for name, info in paper["modules"].items():  # Eq. 7: α_i / r_i = α_total · p_i / r_init
        assert info["scale"] == pytest.approx(8 * 14 * share[name] / 4) and info["rank"] == ranks[name]
    assert (
        min(m["scale"] for m in paper["modules"].values()) < 8 / 4 <= min(m["scale"] for m in extra["modules"].values())
    )
    assert extra["trainable_parameters"] == sum(ranks[n] * m["shape"][0] for n, m in extra["modules"].items())
    _, adapters, _ = read_adapters(init)
    for adapter in adapters.values():
        assert torch.count_nonzero(adapter.B) == 0
        # orthonormal rows: fp64 results rounded to fp32 (2u each), their fp32 Gram summed over d_in terms
        atol = 4 * FP32_UNIT + sum_tolerance(adapter.A.shape[1])
        assert torch.allclose(adapter.A @ adapter.A.T, torch.eye(adapter.rank), atol=atol)


def test_init_groups_batch_same_shapes_in_model_order_within_a_memory_budget():
    shapes = {f"l{i}.{m}": s for i in range(20) for m, s in (("q", (64, 32)), ("down", (32, 128)))}
    groups = init_groups(shapes, by_shape=True)
    assert [len(g) for g in groups] == [16, 4, 16, 4]
    assert groups[0][:2] == ["l0.q", "l1.q"] and groups[2][0] == "l0.down"
    assert sorted(n for g in groups for n in g) == sorted(shapes)
    per_down = 8 * (2 * 32 * 128 + 128 * 128)
    assert [len(g) for g in init_groups(shapes, True, budget_bytes=3 * per_down)][2:] == [3] * 6 + [2]
    # a 7B-sized down_proj (4096 x 11008) needs 1.7 GB of fp64 work space: one at a time
    assert [len(g) for g in init_groups({f"d{i}": (4096, 11008) for i in range(3)}, True)] == [1, 1, 1]
    assert init_groups(shapes, by_shape=False) == [[n] for n in shapes]


def test_top_eigenpairs_match_a_full_eigendecomposition_and_read_the_upper_triangle_only():
    """Threaded MRRR on an index range against LAPACK's full `syevd` (torch.linalg.eigh), on Grams whose
    lower triangle holds garbage, as `add_gram_upper` leaves it."""
    from lrsurgery.linalg.eigen import top_eigenpairs

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 90, 40, generator=generator, dtype=torch.float64) * torch.logspace(0, -4, 40).double()
    grams = rows.mT @ rows
    grams += torch.randn(grams.shape, generator=generator, dtype=torch.float64).tril(-1)  # must not be read
    full_values, full_vectors = torch.linalg.eigh(grams, UPLO="U")
    values, vectors = top_eigenpairs(grams.clone(), 6)  # it uses its input as work space
    # fp64; the top 6 eigenvalues lie within a decade of the largest and are well separated, so any
    # backward-stable eigensolver gets them (and their vectors) to ~1e-14: 1e-10 is machine-independent
    torch.testing.assert_close(values, full_values[:, -6:].flip(-1), rtol=1e-10, atol=0)
    for got, want in zip(vectors, full_vectors[..., -6:].flip(-1), strict=True):
        assert torch.allclose((got * want).sum(0).abs(), torch.ones(6, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("shape", [(200, 60), (60, 60), (40, 90)])  # tall (C·WᵀW·C route), square, wide
def test_top_right_singular_vectors_of_a_product_match_an_exact_svd(shape):
    from lrsurgery.linalg.basics import Workspace
    from lrsurgery.linalg.svd import top_right_singular_vectors_of_product

    generator = torch.Generator().manual_seed(0)
    m, n = shape
    weights = torch.randn(3, m, n, generator=generator, dtype=torch.float64)
    roots = torch.randn(3, n, n, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, n).double()
    covariances = roots @ roots.mT  # symmetric, eigenvalues spread over ~4 decades like activation covariances
    got = top_right_singular_vectors_of_product(weights, covariances, 7, Workspace())
    for rows, w, c in zip(got, weights, covariances, strict=True):
        # fp64 throughout, top-7 gap well above 1e-6 of σ1: the subspace is accurate to ~1e-13 on any machine
        assert subspace_distance(rows, torch.linalg.svd(w @ c)[2][:7]) < 1e-10
        torch.testing.assert_close(rows @ rows.T, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)


def test_batched_tlora_init_equals_one_module_at_a_time(tiny_llama, tiny_stats):
    from lrsurgery.hf.load import model_record
    from lrsurgery.methods import get_method

    loaded = load_model(str(tiny_llama), task="base")
    root = backbone(loaded.model)
    names = [n for n in find_targets(loaded.model) if n.endswith(("k_proj", "v_proj"))]
    weights = {n: root.get_submodule(n).weight.detach().float() for n in names}
    method = get_method("tlora", rank=4, alpha=8, stats=str(tiny_stats))
    method.prepare({n: tuple(w.shape) for n, w in weights.items()}, model_record(loaded))
    together = method.init_modules(weights, torch.Generator())
    for name in names:
        alone = method.init_modules({name: weights[name]}, torch.Generator())[name]
        # fp64 results (entries ≤ 1) rounded to fp32: equal up to a flipped last bit, 1.2e-7 at most
        torch.testing.assert_close(alone.A, together[name].A, rtol=0, atol=1e-6)


def test_ablation_switches(tiny_llama, tiny_stats, tmp_path):
    options = {"rank": 4, "alpha": 8, "stats": str(tiny_stats)}
    fixed = _modules(run_init(str(tiny_llama), "tlora", tmp_path / "a", {**options, "rank_adapt": False}))
    assert {m["rank"] for m in fixed["modules"].values()} == {4}
    assert len({round(m["alpha"], 6) for m in fixed["modules"].values()}) > 1  # alphas still adapt
    plain = _modules(run_init(str(tiny_llama), "tlora", tmp_path / "b", {**options, "alpha_adapt": False}))
    assert {m["alpha"] for m in plain["modules"].values()} == {8.0}
    # no rank or alpha adaptation and A from W alone: no statistics needed at all
    bare = {"rank": 4, "rank_adapt": False, "alpha_adapt": False}
    for a_init in ("w", "random"):
        extra = _modules(run_init(str(tiny_llama), "tlora", tmp_path / a_init, {**bare, "a_init": a_init}))
        assert extra["method"]["a"]["init"] == a_init and extra["trainable_parameters"] == 4 * sum(
            m["shape"][0] for m in extra["modules"].values()
        )


def test_raw_and_centered_covariances_give_their_own_wc_subspaces(tiny_llama, tiny_stats, tmp_path):
    """--covariance raw takes the SVD of W·XᵀX/n, centered (default) of W·C with each sequence centred on
    its mean; both from the one stats artifact, and they select different subspaces."""
    name = "layers.1.mlp.down_proj"
    weight = backbone(load_model(tiny_llama).model).get_submodule(name).weight.detach().double()
    fixed = {"rank": 3, "rank_adapt": False, "alpha_adapt": False, "stats": str(tiny_stats)}
    reader = CovarianceReader(tiny_stats)
    raw_sums, tokens = reader.sums(name)
    centered_sums, _ = reader.centered_sums(name)
    got = {}
    for covariance, sums in (("raw", raw_sums.double()), ("centered", centered_sums)):
        init = run_init(str(tiny_llama), "tlora", tmp_path / covariance, {**fixed, "covariance": covariance})
        got[covariance] = read_adapters(init)[1][name].A
        assert _modules(init)["method"]["a"]["covariance"] == covariance
        vh = torch.linalg.svd(weight @ (sums / tokens))[2][:3]
        assert subspace_distance(got[covariance], vh) < 1e-5, covariance  # fp64 maths stored in fp32
    assert subspace_distance(got["raw"], got["centered"]) > 1e-2
    # an artifact without per-sequence sums (an older calibration) cannot give the centred C
    old = tmp_path / "old"
    import shutil

    shutil.copytree(tiny_stats, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["extra"]["sequence_sums"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MethodError, match="no per-sequence sums .* pass --covariance raw"):
        run_init(str(tiny_llama), "tlora", tmp_path / "o", {**fixed, "stats": str(old)})
    run_init(str(tiny_llama), "tlora", tmp_path / "o", {**fixed, "stats": str(old), "covariance": "raw"})


def test_random_a_is_loras_kaiming_uniform_draw(tiny_llama, tmp_path):
    """Table 12's "random" row is standard LoRA's A: uniform on ±1/√d_in, as `--method lora` draws it."""
    bare = {"rank": 4, "rank_adapt": False, "alpha_adapt": False, "a_init": "random"}
    adapters = read_adapters(run_init(str(tiny_llama), "tlora", tmp_path / "t", bare))[1]
    lora = read_adapters(run_init(str(tiny_llama), "lora", tmp_path / "l", {"rank": 4}))[1]
    for name, adapter in adapters.items():
        bound = adapter.A.shape[1] ** -0.5
        assert float(adapter.A.abs().max()) <= bound and float(lora[name].A.abs().max()) <= bound
        # a Gaussian of std 1/√d_in would put a third of its entries beyond the bound; the uniform draw's
        # std is bound/√3 (the sample std of ≥ 4·32 entries is within 25 % of it with overwhelming odds)
        assert abs(float(adapter.A.std()) / (bound / 3**0.5) - 1) < 0.25, name


def test_w_and_theory_variants_match_their_definitions(tiny_llama, tiny_stats, tmp_path):
    name = "layers.1.mlp.down_proj"
    weight = backbone(load_model(tiny_llama).model).get_submodule(name).weight.detach().double()
    fixed = {"rank": 3, "rank_adapt": False, "alpha_adapt": False, "stats": str(tiny_stats), "covariance": "raw"}
    _, w_init, _ = read_adapters(run_init(str(tiny_llama), "tlora", tmp_path / "w", {**fixed, "a_init": "w"}))
    # an fp64 subspace stored in fp32: rounding of 6e-8 per entry moves it by ~1e-7
    assert subspace_distance(w_init[name].A, torch.linalg.svd(weight)[2][:3]) < 1e-6
    theory = run_init(str(tiny_llama), "tlora", tmp_path / "t", {**fixed, "variant": "theory", "damping": 0.01})
    c = load_covariance(tiny_stats, name).double()
    vh = torch.linalg.svd(weight @ psd_power(c, 0.5, 0.01))[2][:3]
    expected = vh @ psd_power(c, -0.5, 0.01)  # Eq. 3, rows up to sign
    got = read_adapters(theory)[1][name].A.double()
    signs = torch.sign((got * expected).sum(dim=1, keepdim=True))
    # fp64 maths (damped C, so C^{-1/2} has condition ≤ 1/damping) stored in fp32: ~1e-7 relative
    assert float((got - signs * expected).norm() / expected.norm()) < 1e-4


@pytest.mark.slow
def test_a_spans_the_top_subspace_of_wc_and_output_is_unchanged_smollm2(smollm2, bbc_small, tmp_path):
    cfg = CalibrateConfig(samples=4, seq_len=64, batch_size=2, collect=BOTH)
    stats = run_calibrate(str(smollm2), DataSpec(path=str(bbc_small)), cfg, tmp_path / "stats")
    init = run_init(str(smollm2), "tlora", tmp_path / "init", {"rank": 8, "alpha": 16, "stats": str(stats)})
    manifest, adapters, _ = read_adapters(init)
    assert sum(a.rank for a in adapters.values()) == 8 * 210
    root = backbone(load_model(smollm2).model)
    # layer 11: its down_proj has the worst-conditioned W·C of the model on BBC News statistics
    names = [n for n in adapters if n.startswith(("layers.0.", "layers.11.", "layers.14.", "layers.29."))]
    reader = CovarianceReader(stats)
    for name in names:
        weight = root.get_submodule(name).weight.detach().double()
        centered, tokens = reader.centered_sums(name)  # the default C (checked against hooks in test_calibrate)
        product = weight @ (centered / tokens)
        vh = torch.linalg.svd(product, full_matrices=False)[2][: adapters[name].rank]  # exact fp64 reference
        # fp64 Gram of W·C: its error is set by W·C's conditioning, not the kernels (worst 1.5e-6 seen, on
        # layers.11.mlp.down_proj, σ1/σ8 ≈ 3e5); another machine changes the digits, not the size
        assert subspace_distance(adapters[name].A, vh) <= 1e-5, name
    assert_adapted_equals_base(init, smollm2)


class OptimizerSpy(TrainHooks):
    def __init__(self):
        self.params: set[int] = set()

    def after_step(self, ctx):
        """The model tensors whose storage lies in what the optimizer updates (its flat buffers)."""
        model, optimizer = ctx.model, ctx.optimizer
        spans = [
            (p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
            for group in optimizer.param_groups
            for p in group["params"]
        ]
        tensors = [t for m in model.modules() for t in (getattr(m, "lora_A", None), getattr(m, "lora_B", None))]
        self.params = {id(t) for t in tensors if t is not None and any(lo <= t.data_ptr() < hi for lo, hi in spans)}
        self.a_ids = {id(m.lora_A) for m in model.modules() if hasattr(m, "lora_A")}
        self.b_ids = {id(m.lora_B) for m in model.modules() if hasattr(m, "lora_B")}
        return {}


def test_a_stays_bit_identical_and_out_of_the_optimizer(tiny_llama, tiny_stats, bbc_small, tmp_path):
    init = run_init(str(tiny_llama), "tlora", tmp_path / "i", {"rank": 4, "alpha": 8, "stats": str(tiny_stats)})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    spy = OptimizerSpy()
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=2, lr=1e-2), tmp_path / "r", hooks=[spy])
    assert spy.params == spy.b_ids and not spy.params & spy.a_ids
    before, after = load_tensors(init / "adapter.safetensors"), load_tensors(run / "adapter.safetensors")
    for key in before:
        if key.endswith("lora_A"):
            assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    extra = _modules(run)
    assert extra["trainable_parameters"] == sum(m["rank"] * m["shape"][0] for m in extra["modules"].values())


def test_clear_errors(tiny_llama, tiny_llama_other, tiny_stats, bbc_small, tmp_path):
    options = {"rank": 4, "stats": str(tiny_stats)}
    with pytest.raises(ArtifactError, match="stats artifact was made for model .* pass --force"):
        run_init(str(tiny_llama_other), "tlora", tmp_path / "a", options)
    run_init(str(tiny_llama_other), "tlora", tmp_path / "forced", options, force=True)
    with pytest.raises(MethodError, match="needs --stats"):
        run_init(str(tiny_llama), "tlora", tmp_path / "b", {"rank": 4})
    covariance_only = run_calibrate(
        str(tiny_llama),
        DataSpec(path=str(bbc_small)),
        CalibrateConfig(samples=2, seq_len=32, collect=("covariance",)),
        tmp_path / "cov",
    )
    with pytest.raises(MethodError, match="no sensitivities"):
        run_init(str(tiny_llama), "tlora", tmp_path / "c", {"rank": 4, "stats": str(covariance_only)})
    with pytest.raises(MethodError, match="cannot give each of 14 modules --min-rank 5"):
        run_init(str(tiny_llama), "tlora", tmp_path / "d", {**options, "min_rank": 5})
    with pytest.raises(MethodError, match="larger than module"):
        run_init(str(tiny_llama), "tlora", tmp_path / "e", {**options, "rank": 40, "rank_adapt": False})
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_stats, broken)
    sens = load_tensors(broken / "sensitivity.safetensors")
    sens["sens.layers.0.mlp.up_proj"] = torch.tensor([float("nan")])
    save_tensors(broken / "sensitivity.safetensors", sens)
    with pytest.raises(ArtifactError, match="non-finite sensitivity for layers.0.mlp.up_proj"):  # the file is damaged
        run_init(str(tiny_llama), "tlora", tmp_path / "f", {"rank": 4, "stats": str(broken)})
    shutil.copytree(tiny_stats, tmp_path / "broken-cov")
    info = json.loads((tmp_path / "broken-cov" / "manifest.json").read_text())["extra"]["modules"][
        "layers.1.mlp.down_proj"
    ]
    tensors = load_tensors(tmp_path / "broken-cov" / info["file"])
    tensors[f"cov.{info['covariance']}"][3, 5] = float("inf")
    save_tensors(tmp_path / "broken-cov" / info["file"], tensors)
    with pytest.raises(MethodError, match="non-finite covariance values for layers.1.mlp.down_proj"):
        run_init(str(tiny_llama), "tlora", tmp_path / "g", {"rank": 4, "stats": str(tmp_path / "broken-cov")})
    assert not any((tmp_path / x).exists() for x in "abcdefg")


def test_cli_init_train_and_peft_export_carry_the_rank_and_alpha_patterns(tiny_llama, tiny_stats, bbc_small, tmp_path):
    code, out = cli(
        "init", tiny_llama, "--method", "tlora", "--stats", tiny_stats, "--rank", 4, "--alpha", 8, "-o", tmp_path / "i"
    )
    assert code == 0, out
    data = ["--data", bbc_small, "--prompt-template", PROMPT, "--response-template", RESPONSE, "--seq-len", 48]
    code, out = cli("train", tmp_path / "i", *data, "--max-steps", 3, "--lr", 1e-2, "-o", tmp_path / "r")
    assert code == 0, out
    code, out = cli("fuse", tmp_path / "r", "--format", "peft", "-o", tmp_path / "peft")
    assert code == 0, out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    from lrsurgery.calibration.stats_file import stats_fingerprint
    from lrsurgery.io.artifacts import read_manifest

    # the model card names the calibration the init read
    assert (
        f"| calibration statistics fingerprint | `{stats_fingerprint(read_manifest(tiny_stats))}` |"
        in (tmp_path / "peft" / "README.md").read_text()
    )
    modules = _modules(tmp_path / "i")["modules"]
    prefix = next(iter(config["rank_pattern"])).rsplit("layers.", 1)[0]
    for name, info in modules.items():
        assert config["rank_pattern"][prefix + name] == info["rank"]
        assert config["alpha_pattern"][prefix + name] == pytest.approx(info["alpha"])
    # the real peft library on the unmodified base reproduces the trained TLoRA model
    pytest.importorskip("peft")
    from test_export import assert_peft_export_is_exact
    from transformers import AutoModelForCausalLM

    expected = assert_peft_export_is_exact(tmp_path / "r", tmp_path / "check", AutoModelForCausalLM, tiny_llama)
    assert (
        max_abs(outputs(AutoModelForCausalLM.from_pretrained(tiny_llama), load_model(tiny_llama).tokenizer), expected)
        > 1e-4
    )
    code, out = cli("init", tiny_llama, "--method", "tlora", "--rank", 4, "-o", tmp_path / "j")
    assert code == 1 and "needs --stats" in out


@pytest.mark.skipif(
    not os.access("/sys/fs/cgroup/memory", os.W_OK), reason="needs a writable cgroup v1 memory controller (root)"
)
def test_init_workspace_budget_follows_a_memory_cgroup_limit():
    """Inside a memory cgroup, init sizes its groups by what the limit leaves, not by the machine's memory."""
    available = "from lrsurgery.io.memory import available_memory; print(available_memory())"
    budget = "import torch; from lrsurgery.stages.init import workspace_budget as w; print(w(torch.device('cpu')))"
    group = Path("/sys/fs/cgroup/memory") / f"lrsurgery-test-{os.getpid()}"
    limit = 768 << 20

    def run(source: str, limited: bool) -> int:
        enter = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if limited else None
        return int(
            subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, preexec_fn=enter).stdout
        )

    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        outside, inside, inside_budget = run(available, False), run(available, True), run(budget, True)
    finally:
        group.rmdir()
    assert outside > limit  # the machine has more than the limit, so inside, the limit is what is seen
    assert 0 < inside < limit
    assert 0 < inside_budget <= limit // 3
