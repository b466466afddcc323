"""Initialisations must leave the model's output unchanged on real models: exact in fp64, and in fp32
within the rounding of the two models themselves (measured in the test, see helpers.assert_same_function)."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_UNIT, FP64_EXACT, assert_adapted_equals_base, max_abs, outputs

from lrsurgery.hf.load import load_model
from lrsurgery.layers.adapted import adapted_layers, inject
from lrsurgery.layers.adapter_file import read_adapters
from lrsurgery.linalg.svd import subspace_distance, truncated_svd
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.init import run_init

CASES = [
    ("smollm2", "causal", "lora", {}),
    ("smollm2", "causal", "pissa", {}),
    ("smollm2", "causal", "pissa", {"svd": "randomized"}),
    ("minilm", "base", "lora", {}),
    ("minilm", "base", "pissa", {}),
]


@pytest.mark.slow
def test_pissa_init_is_exact_in_fp64(smollm2, tmp_path):
    out = run_init(str(smollm2), "pissa", tmp_path / "init", {"rank": 8, "alpha": 16})
    base = load_model(smollm2, dtype=torch.float64)
    reference = outputs(base.model, base.tokenizer)
    _, adapters, _ = read_adapters(out)
    inject(base.model, adapters)
    assert max_abs(outputs(base.model, base.tokenizer), reference) <= FP64_EXACT * float(reference.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("model_name,task,method,extra", CASES)
def test_init_leaves_output_unchanged(request, tmp_path, model_name, task, method, extra):
    """fp32: the adapted model (whose principal part runs through a separate rank-r branch for PiSSA)
    differs from the base model by no more than the fp32 rounding of the two, measured against the
    same two models in fp64, where they must agree exactly."""
    folder = request.getfixturevalue(model_name)
    out = run_init(str(folder), method, tmp_path / "init", {"rank": 8, "alpha": 16, **extra})
    layers = adapted_layers(load_adapted(out, task=task)[0].model)
    assert len(layers) == (7 * 30 if model_name == "smollm2" else 6 * 6)
    assert_adapted_equals_base(out, folder, task)
    if method == "pissa":  # the adapter really carries the principal part (B ≠ 0), so the check is not vacuous
        assert all(layer.lora_B.abs().max() > 0 for layer in layers.values())


@pytest.mark.slow
def test_pissa_adapter_is_the_principal_part(smollm2, tmp_path):
    """s·B·A equals the top-r SVD part of W, and the edit log holds exactly −s·B·A."""
    out = run_init(str(smollm2), "pissa", tmp_path / "init", {"rank": 4, "alpha": 8}, targets=r"layers\.3\.mlp\.")
    manifest, adapters, _ = read_adapters(out)
    base = load_model(smollm2, task="base").model
    for name, spec in adapters.items():
        weight = base.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        principal = (u[:, :4] * s[:4]) @ vh[:4]
        # the floor: an fp32 SVD's own error on this weight (LAPACK's, on this machine), plus the rounding of
        # the two stored fp32 factors, ≤ 2u per entry of each term of the rank-4 sum
        u32, s32, vh32 = torch.linalg.svd(weight.float(), full_matrices=False)
        fp32_svd = ((u32[:, :4] * s32[:4]) @ vh32[:4]).double()
        floor = float((fp32_svd - principal).norm() / principal.norm()) + 2 * 4 * FP32_UNIT
        adapter = spec.scale * spec.B.double() @ spec.A.double()
        assert float((adapter - principal).norm() / principal.norm()) <= floor
        # the edit's B is −s·B rounded to fp32 once: |edit + s·B·A| ≤ u·(|s·B| |A|) entry by entry
        rounding = FP32_UNIT * (spec.scale * spec.B.double().abs()) @ spec.A.double().abs()
        assert torch.all(
            (spec.edit_delta().double() + adapter).abs() <= rounding + FP64_EXACT * float(adapter.abs().max())
        )


def test_randomized_svd_matches_exact_on_low_rank_plus_noise():
    """σ9/σ8 = 0.002 and 2 power iterations leave a range error of about 0.002^5 (Halko et al. 2011), far
    below fp32 rounding (~1e-6 here, on any machine): 1e-4 tests the algorithm, not the kernels."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(120, 120, generator=gen))
    s = torch.cat([torch.linspace(10, 5, 8), torch.full((112,), 0.01)])
    matrix = (u[:, :120] * s) @ v.T
    ue, se, vhe = truncated_svd(matrix, 8, "exact")
    ur, sr, vhr = truncated_svd(matrix, 8, "randomized", generator=gen)
    assert torch.allclose(se, sr, rtol=1e-4)
    exact = (ue * se) @ vhe
    approx = (ur * sr) @ vhr
    assert float((exact - approx).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("shape", [(200, 120), (120, 200), (1100, 1030)])
def test_exact_truncated_svd_is_the_fp64_svd_top_part(shape):
    """The Gram + top-eigenpairs route against LAPACK's full fp64 SVD, tall, wide, and large enough for the
    block Krylov route (Gram ≥ 1024). With σ_r = 5 over σ_r+1 = 0.01, a backward-stable fp64 eigensolve of
    the Gram is off by ≲ n·u·σ1²/(σ_r² − σ_r+1²) ≈ 1e-12 in subspace; the Krylov route is accepted only
    below 1e-8 (its own check), which bounds the large case on any machine."""
    m, n = shape
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))
    s = torch.cat(
        [torch.linspace(10, 5, 8, dtype=torch.float64), torch.full((min(m, n) - 8,), 0.01, dtype=torch.float64)]
    )
    matrix = (u * s) @ v.T
    got_u, got_s, got_vh = truncated_svd(matrix, 8, "exact")
    bound = 1e-8 if min(m, n) >= 1024 else 1e-10
    assert subspace_distance(got_vh, v[:, :8].T) <= bound
    # λ_r = σ_r² errs by ≲ n·u·σ1² (≲ 5e-13 of σ_r² here), so σ_r by half that, on any CPU
    torch.testing.assert_close(got_s, s[:8], rtol=1e-12, atol=0)
    principal = (u[:, :8] * s[:8]) @ v[:, :8].T
    assert float(((got_u * got_s) @ got_vh - principal).norm() / principal.norm()) <= bound
    assert got_vh.dtype == torch.float64 and truncated_svd(matrix.float(), 8, "exact")[2].dtype == torch.float32


def test_lora_init_is_seeded(tiny_llama, tmp_path):
    a = read_adapters(run_init(str(tiny_llama), "lora", tmp_path / "a", {"rank": 4}, seed=5))[1]
    b = read_adapters(run_init(str(tiny_llama), "lora", tmp_path / "b", {"rank": 4}, seed=5))[1]
    c = read_adapters(run_init(str(tiny_llama), "lora", tmp_path / "c", {"rank": 4}, seed=6))[1]
    name = next(iter(a))
    assert torch.equal(a[name].A, b[name].A)
    assert not torch.equal(a[name].A, c[name].A)
    assert torch.count_nonzero(a[name].B) == 0


def test_init_records_every_option_as_used(tiny_llama, tmp_path):
    import json

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {})
    options = json.loads((init / "manifest.json").read_text())["config"]["options"]
    assert options == {"rank": 8, "alpha": 8.0, "dropout": 0.0}


def test_a_branch_may_not_take_the_main_branch_parameter_names():
    from lrsurgery.layers.spec import LowRank, ModuleAdapter

    def branch(name: str) -> LowRank:
        return LowRank(torch.zeros(1, 4), torch.zeros(4, 1), 1.0, 1.0, 0.0, name=name)

    ModuleAdapter([branch(""), branch("expert")])
    for bad in ("lora", "ex.pert", ""):
        with pytest.raises(ValueError, match="main branch"):
            ModuleAdapter([branch(""), branch(bad)])
