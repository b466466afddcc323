"""PEFT export: the real `peft` library on the unmodified base reproduces the adapted model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FP64_UNIT, PROMPT, RESPONSE, assert_same_function, max_abs, outputs, sum_tolerance

from lrsurgery.data.examples import DataSpec
from lrsurgery.layers.adapter_file import read_adapters
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.export_peft import compress, concatenated_factors, run_export_peft
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train

peft = pytest.importorskip("peft")


def _trained(model_folder, data_path, tmp_path, method, task="causal", steps=3):
    init = run_init(str(model_folder), method, tmp_path / "init", {"rank": 4, "alpha": 8})
    if task == "classification":
        data = DataSpec(path=str(data_path), task="classification", seq_len=48)
    else:
        data = DataSpec(path=str(data_path), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    return run_train(init, data, TrainConfig(max_steps=steps, batch_size=2, lr=2e-3), tmp_path / "run")


def _peft_outputs(base_cls, base_folder, adapter, tokenizer, **kwargs):
    base = base_cls.from_pretrained(base_folder, **kwargs)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    return outputs(model, tokenizer)


def assert_peft_export_is_exact(artifact, tmp_path, base_cls, base_folder, task=None, **kwargs):
    """Export `artifact` in fp32 and fp64; the real PEFT on the unmodified base (in the same dtype)
    must be the adapted model's function: exact in fp64, within the two models' rounding in fp32."""
    run_export_peft(artifact, tmp_path / "peft")
    run_export_peft(artifact, tmp_path / "peft64", dtype="fp64")
    adapted, _ = load_adapted(artifact, task=task)
    adapted64, _ = load_adapted(artifact, task=task, dtype=torch.float64)
    tokenizer = adapted.tokenizer
    assert_same_function(
        _peft_outputs(base_cls, base_folder, tmp_path / "peft", tokenizer, **kwargs),
        _peft_outputs(base_cls, base_folder, tmp_path / "peft64", tokenizer, dtype=torch.float64, **kwargs),
        outputs(adapted.model, tokenizer),
        outputs(adapted64.model, tokenizer),
        f"PEFT export of {artifact.name}",
    )
    return outputs(adapted.model, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_peft_export_smollm2(smollm2, bbc_small, tmp_path, method):
    from transformers import AutoModelForCausalLM

    run = _trained(smollm2, bbc_small, tmp_path, method)
    expected = assert_peft_export_is_exact(run, tmp_path, AutoModelForCausalLM, smollm2)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and len(config["target_modules"]) == 210
    assert set(config["rank_pattern"].values()) == ({4} if method == "lora" else {8})  # PiSSA: edit + adapter
    plain = outputs(AutoModelForCausalLM.from_pretrained(smollm2), load_adapted(run)[0].tokenizer)
    assert max_abs(plain, expected) > 1e-2  # the adapter is not a no-op


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_peft_export_minilm_classifier(minilm, bbc_small, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    run = _trained(minilm, bbc_small, tmp_path, method, task="classification")
    assert_peft_export_is_exact(run, tmp_path, AutoModelForSequenceClassification, minilm, num_labels=5)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]


def test_peft_export_tiny_bare_encoder(tiny_bert, tmp_path):
    """An init artifact of a bare encoder (no head): exported delta equals W_res + s·B·A − W0 exactly."""
    from transformers import AutoModel

    init = run_init(str(tiny_bert), "pissa", tmp_path / "init", {"rank": 4})
    adapted, _ = load_adapted(init, task="base")
    for layer in adapted.model.modules():  # move away from init so the check is not trivially zero
        if hasattr(layer, "lora_B"):
            layer.lora_B.data += 0.01
    from lrsurgery.io.artifacts import save_tensors
    from lrsurgery.layers.adapted import adapted_layers
    from lrsurgery.layers.adapter_file import ADAPTER_FILE, to_tensors

    tensors, _ = to_tensors({n: m.export() for n, m in adapted_layers(adapted.model).items()})
    save_tensors(init / ADAPTER_FILE, tensors)
    assert_peft_export_is_exact(init, tmp_path, AutoModel, tiny_bert, task="base")


def test_max_rank_error_matches_direct_svd(tiny_llama, bbc_small, tmp_path):
    run = _trained(tiny_llama, bbc_small, tmp_path, "pissa", steps=2)
    report = run_export_peft(run, tmp_path / "peft", max_rank=3)
    _, adapters, _ = read_adapters(run)
    dropped = total = 0.0
    for name, spec in adapters.items():  # fp64 throughout: the reported errors agree to ~1e-13
        b, a = concatenated_factors(spec)
        s = torch.linalg.svdvals(b @ a)
        module_err = float((s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        assert report["module_relative_error"][f"model.{name}"] == pytest.approx(module_err, rel=1e-6, abs=1e-12)
        dropped += float((s[3:] ** 2).sum())
        total += float((s**2).sum())
        assert report["module_rank"][f"model.{name}"] == 3
    assert report["overall_relative_error"] == pytest.approx((dropped / total) ** 0.5, rel=1e-6)
    assert 0 < report["overall_relative_error"] < 1


def test_compress_is_best_rank_k():
    gen = torch.Generator().manual_seed(0)
    b, a = (
        torch.randn(40, 6, generator=gen, dtype=torch.float64),
        torch.randn(6, 30, generator=gen, dtype=torch.float64),
    )
    packed = compress(b, a, 2)
    u, s, vh = torch.linalg.svd(b @ a)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(packed.B @ packed.A, best, atol=1e-10)  # fp64, σ2/σ3 well separated: ~1e-14
    same = compress(b, a, None)
    assert torch.equal(same.B, b) and same.dropped_sq == 0.0


def test_a_gated_one_branch_adapter_is_exported_with_its_mask():
    from lrsurgery.layers.spec import LowRank, ModuleAdapter
    from lrsurgery.stages.export_peft import as_it_is

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    gate, mask = torch.randn(4, generator=g), torch.tensor([1.0, 0.0, 1.0, 0.0])
    spec = ModuleAdapter([LowRank(a, b, 0.5, 2.0, E=gate, mask=mask)])
    packed = as_it_is(spec)
    # the product of the exported factors is the adapter's own: fp64 sums of 4 products in either order
    terms = spec.scale * (b.double() * (gate * mask).double()).abs() @ a.double().abs()
    assert max_abs(spec.scale * packed.B @ packed.A, spec.product()) <= sum_tolerance(4, FP64_UNIT) * terms.max()
    # ‖Δ‖²_F from r×r Grams: sums of (d_out + d_in + r²) products, bounded by the same sums of |products|
    bg, aa = (b.double() * (gate * mask).double()).abs(), a.double().abs()
    bound = spec.scale**2 * float(((bg.T @ bg) * (aa @ aa.T)).sum()) * sum_tolerance(5 + 6 + 16, FP64_UNIT)
    assert abs(packed.total_sq - float(spec.product().square().sum())) <= bound
    assert bool((packed.B[:, 1] == 0).all()) and bool((packed.B[:, 3] == 0).all())
