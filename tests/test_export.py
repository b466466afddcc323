"""PEFT export: the real `peft` library on the unmodified base reproduces the adapted model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPT, RESPONSE, max_abs, outputs
from test_init_exact import PISSA_SMOLLM2_FP32

from lrsurgery.data import DataSpec
from lrsurgery.export_peft import compress, concatenated_factors, run_export_peft
from lrsurgery.surgery import load_adapted, read_adapters, run_init
from lrsurgery.train import TrainConfig, run_train

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


@pytest.mark.slow
@pytest.mark.parametrize("method,tol", [("lora", 1e-4), ("pissa", PISSA_SMOLLM2_FP32)])
def test_peft_export_smollm2(smollm2, bbc_small, tmp_path, method, tol):
    from transformers import AutoModelForCausalLM

    run = _trained(smollm2, bbc_small, tmp_path, method)
    adapted, _ = load_adapted(run)
    expected = outputs(adapted.model, adapted.tokenizer)
    run_export_peft(run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and len(config["target_modules"]) == 210
    assert set(config["rank_pattern"].values()) == ({4} if method == "lora" else {8})  # PiSSA: edit + adapter
    got = _peft_outputs(AutoModelForCausalLM, smollm2, tmp_path / "peft", adapted.tokenizer)
    assert max_abs(got, expected) <= tol
    plain = outputs(AutoModelForCausalLM.from_pretrained(smollm2), adapted.tokenizer)
    assert max_abs(plain, expected) > 1e-2  # the adapter is not a no-op


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_peft_export_minilm_classifier(minilm, bbc_small, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    run = _trained(minilm, bbc_small, tmp_path, method, task="classification")
    adapted, _ = load_adapted(run)
    expected = outputs(adapted.model, adapted.tokenizer)
    run_export_peft(run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    got = _peft_outputs(AutoModelForSequenceClassification, minilm, tmp_path / "peft", adapted.tokenizer, num_labels=5)
    assert max_abs(got, expected) <= 1e-4


def test_peft_export_tiny_bare_encoder(tiny_bert, tmp_path):
    """An init artifact of a bare encoder (no head): exported delta equals W_res + s·B·A − W0 exactly."""
    from transformers import AutoModel

    init = run_init(str(tiny_bert), "pissa", tmp_path / "init", {"rank": 4})
    adapted, _ = load_adapted(init, task="base")
    for layer in adapted.model.modules():  # move away from init so the check is not trivially zero
        if hasattr(layer, "lora_B"):
            layer.lora_B.data += 0.01
    from lrsurgery.adapters import adapted_layers, to_tensors
    from lrsurgery.artifacts import save_tensors
    from lrsurgery.surgery import ADAPTER_FILE

    tensors, _ = to_tensors({n: m.export() for n, m in adapted_layers(adapted.model).items()})
    save_tensors(init / ADAPTER_FILE, tensors)
    expected = outputs(adapted.model, adapted.tokenizer)
    run_export_peft(init, tmp_path / "peft")
    got = _peft_outputs(AutoModel, tiny_bert, tmp_path / "peft", adapted.tokenizer)
    assert max_abs(got, expected) <= 1e-5


def test_max_rank_error_matches_direct_svd(tiny_llama, bbc_small, tmp_path):
    run = _trained(tiny_llama, bbc_small, tmp_path, "pissa", steps=2)
    report = run_export_peft(run, tmp_path / "peft", max_rank=3)
    _, adapters, _ = read_adapters(run)
    dropped = total = 0.0
    for name, spec in adapters.items():
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
    assert torch.allclose(packed.B @ packed.A, best, atol=1e-10)
    same = compress(b, a, None)
    assert torch.equal(same.B, b) and same.dropped_sq == 0.0
