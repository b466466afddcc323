"""Calibration: sequential block-by-block covariances equal whole-model hooks; dedupe; resume; errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import FP64_UNIT, sum_tolerance, write_jsonl

from lrsurgery.calibration import runner as calibration
from lrsurgery.calibration.covariance import CalibrationError
from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
from lrsurgery.calibration.stats_file import load_covariance
from lrsurgery.data.examples import DataSpec, build_examples, collate
from lrsurgery.hf.load import default_task, load_model
from lrsurgery.hf.tree import backbone, find_targets
from lrsurgery.io.artifacts import load_tensors
from lrsurgery.linalg.gram import add_gram_upper, symmetrize_upper_


@pytest.fixture(scope="module")
def lm_data(bbc, tmp_path_factory):
    """Real BBC articles as plain text for language-model calibration."""
    rows = [json.loads(x) for x in (bbc / "train.jsonl").read_text().splitlines()[:60]]
    return write_jsonl(tmp_path_factory.mktemp("cal") / "text.jsonl", [{"text": r["text"]} for r in rows])


@torch.no_grad()
def whole_model_covariances(folder, data_path, cfg, normalise=True):
    """Reference: plain forward hooks on the whole model, same sequences, C = XᵀX / n (or sums, n)."""
    loaded = load_model(folder, task=default_task(folder))
    examples = build_examples(DataSpec(path=str(data_path), seq_len=cfg.seq_len), loaded.tokenizer)
    rows = examples.rows[: cfg.samples]
    root = backbone(loaded.model)
    sums, count = {}, [0]

    def hook(name):
        def fn(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return fn

    names = find_targets(loaded.model)
    handles = [root.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    for i in range(0, len(rows), cfg.batch_size):
        batch = collate(rows[i : i + cfg.batch_size], loaded.tokenizer.pad_token_id, "causal")
        loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        count[0] += int(batch["attention_mask"].sum())
    for h in handles:
        h.remove()
    return {n: s / count[0] for n, s in sums.items()} if normalise else (sums, count[0])


def _check_against_whole_model(folder, data_path, tmp_path, cfg, per_block):
    stats = run_calibrate(str(folder), DataSpec(path=str(data_path)), cfg, tmp_path / "stats")
    reference = whole_model_covariances(folder, data_path, cfg)
    manifest = json.loads((stats / "manifest.json").read_text())
    owners = {m["covariance"] for m in manifest["extra"]["modules"].values()}
    assert len(owners) == per_block * manifest["extra"]["blocks"]
    tokens = manifest["extra"]["tokens"]  # both sum the same activations over these tokens, in fp32 here
    for name, expected in reference.items():
        got = load_covariance(stats, name).double()
        assert float((got - expected).norm() / expected.norm()) <= sum_tolerance(tokens), name
        assert torch.equal(got, got.T), name


@pytest.mark.parametrize("d", [64, 200, 577])
def test_upper_triangle_gram_equals_the_full_product(d):
    """Panels of ≥ 96 columns (1, 2 and 6 of them here) accumulate Σ xᵀx over micro-batches exactly."""
    generator = torch.Generator().manual_seed(d)
    batches = [torch.randn(n, d, generator=generator, dtype=torch.float64) for n in (7, 300, 33)]
    upper = None
    for rows in batches:
        upper = add_gram_upper(upper, rows)
    full = sum(rows.T @ rows for rows in batches)
    got = symmetrize_upper_(upper)
    assert torch.equal(got, got.T)
    assert float((got - full).abs().max() / full.abs().max()) <= sum_tolerance(340, FP64_UNIT)


def test_sequential_equals_whole_model_tiny(tiny_llama, lm_data, tmp_path):
    _check_against_whole_model(
        tiny_llama, lm_data, tmp_path, CalibrateConfig(samples=6, seq_len=32, batch_size=4, shuffle=False), 4
    )


@pytest.mark.slow
def test_sequential_equals_whole_model_smollm2(smollm2, lm_data, tmp_path):
    """q/k/v and gate/up read one tensor each: 4 covariances per Llama block, not 7."""
    _check_against_whole_model(
        smollm2, lm_data, tmp_path, CalibrateConfig(samples=8, seq_len=64, batch_size=4, shuffle=False), 4
    )


@pytest.mark.slow
def test_sequential_equals_whole_model_minilm(minilm, lm_data, tmp_path):
    """BERT: query/key/value share; attention.output.dense, intermediate.dense, output.dense do not."""
    _check_against_whole_model(
        minilm, lm_data, tmp_path, CalibrateConfig(samples=8, seq_len=64, batch_size=4, shuffle=False), 4
    )


def test_resume_after_interruption_gives_identical_files(tiny_llama, lm_data, tmp_path, monkeypatch):
    cfg = CalibrateConfig(samples=6, seq_len=32, batch_size=4)
    whole = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "whole")
    original = calibration.write_block

    def crash_on_second(work, index, *block):
        if index == 1:
            raise KeyboardInterrupt
        original(work, index, *block)

    monkeypatch.setattr(calibration, "write_block", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "again")
    monkeypatch.setattr(calibration, "write_block", original)
    assert json.loads((tmp_path / "again.partial" / "manifest.json").read_text())["extra"]["completed"] == 1
    with pytest.raises(Exception, match="--resume"):
        run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "again")
    again = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "again", resume=True)
    for file in sorted(whole.glob("block_*.safetensors")):
        assert (again / file.name).read_bytes() == file.read_bytes()


def test_clear_errors(tiny_llama, lm_data, tmp_path):
    with pytest.raises(CalibrationError, match="--samples 100000 were asked for"):
        run_calibrate(
            str(tiny_llama), DataSpec(path=str(lm_data)), CalibrateConfig(samples=100000, seq_len=32), tmp_path / "a"
        )
    with pytest.raises(CalibrationError, match="longer than the model allows"):
        run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), CalibrateConfig(seq_len=100000), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_merged_stats_equal_one_run_over_the_union(tiny_llama, bbc, tmp_path):
    from lrsurgery.calibration.stats_file import merge_stats

    rows = [json.loads(x)["text"] for x in (bbc / "train.jsonl").read_text().splitlines()[:40]]
    part_a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in rows[:20]])
    part_b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in rows[20:]])
    cfg = CalibrateConfig(samples=6, seq_len=32, batch_size=3, shuffle=False)
    a = run_calibrate(str(tiny_llama), DataSpec(path=str(part_a)), cfg, tmp_path / "sa")
    b = run_calibrate(str(tiny_llama), DataSpec(path=str(part_b)), cfg, tmp_path / "sb")
    merged = merge_stats([a, b], tmp_path / "merged")
    (sums_a, n_a), (sums_b, n_b) = (
        whole_model_covariances(tiny_llama, p, cfg, normalise=False) for p in (part_a, part_b)
    )
    for name in sums_a:
        union = (sums_a[name] + sums_b[name]) / (n_a + n_b)
        got = load_covariance(merged, name).double()
        assert float((got - union).norm() / union.norm()) <= sum_tolerance(n_a + n_b), name
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["data"]["samples"] == 12 and len(manifest["data"]["fingerprint"]) == 2
    # each sequence is centred on its own mean: the union's centred sums are the parts' sums added
    from lrsurgery.calibration.stats_file import CovarianceReader

    for name in sums_a:
        parts = [CovarianceReader(p).centered_sums(name) for p in (a, b)]
        got, n = CovarianceReader(merged).centered_sums(name)
        union = parts[0][0] + parts[1][0]
        assert n == parts[0][1] + parts[1][1]
        assert float((got - union).norm() / union.norm()) <= sum_tolerance(n), name


def test_centered_covariance_equals_per_sequence_centring_by_hooks(tiny_llama, bbc_small, tmp_path):
    """XᵀX − Σ_s S_s S_sᵀ / n_s from the artifact equals Σ_s Σ_t (x_t − x̄_s)(x_t − x̄_s)ᵀ formed directly,
    one unpadded sequence at a time, for all tokens and for response tokens only (padded batches)."""
    from helpers import PROMPT, RESPONSE

    from lrsurgery.calibration.stats_file import CovarianceReader

    spec = DataSpec(path=str(bbc_small), seq_len=128, prompt_template=PROMPT, response_template=RESPONSE)
    loaded = load_model(tiny_llama)
    rows = build_examples(spec, loaded.tokenizer).rows[:5]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # batches of 2 are padded
    name = "layers.1.mlp.down_proj"
    captured = []
    handle = backbone(loaded.model).get_submodule(name).register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        for row in rows:
            loaded.model(input_ids=torch.tensor([row["input_ids"]]))
    handle.remove()
    for tokens in ("all", "response"):
        cfg = CalibrateConfig(samples=5, seq_len=128, batch_size=2, tokens=tokens, shuffle=False, dtype="fp64")
        stats = run_calibrate(str(tiny_llama), spec, cfg, tmp_path / tokens)
        expected, count = torch.zeros(()), 0
        for h, row in zip(captured, rows, strict=True):
            x = h[0].double()
            if tokens == "response":
                x = x[torch.tensor(row["labels"]) != -100]
            centred = x - x.mean(dim=0)
            expected, count = expected + centred.T @ centred, count + x.shape[0]
        got, n = CovarianceReader(stats).centered_sums(name)
        assert n == count
        # fp64 sums both ways, but of fp32 activations from padded batches here and single sequences there,
        # which differ by fp32 rounding: the bound of an fp32 sum over these tokens covers both
        assert float((got - expected).norm() / expected.norm()) <= sum_tolerance(count), tokens
        raw, _ = CovarianceReader(stats).sums(name)
        assert float((raw.double() - expected).norm() / expected.norm()) > 1e-3  # the means matter here


def test_calibration_draws_its_samples_with_a_seed(tiny_llama, lm_data, tmp_path):
    """--seed draws which sequences are used (recorded in the manifest); --no-shuffle takes the first ones;
    drawing every sequence gives the same sums as taking them in order."""
    examples = build_examples(DataSpec(path=str(lm_data), seq_len=32), load_model(tiny_llama).tokenizer)
    every = len(examples.rows)
    name = "layers.0.mlp.down_proj"

    def covariance(tag, **options):
        cfg = CalibrateConfig(seq_len=32, batch_size=4, collect=("covariance",), **options)
        stats = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / tag)
        config = json.loads((stats / "manifest.json").read_text())["config"]
        assert config["seed"] == options.get("seed", 0) and config["shuffle"] == options.get("shuffle", True)
        return load_covariance(stats, name).double()

    first = covariance("first", samples=4, shuffle=False)
    seed0, seed0_again, seed1 = (covariance(t, samples=4, seed=s) for t, s in (("a", 0), ("b", 0), ("c", 1)))
    assert torch.equal(seed0, seed0_again)
    assert not torch.equal(seed0, seed1) and not torch.equal(seed0, first)
    all_in_order, all_drawn = covariance("all", samples=every, shuffle=False), covariance("drawn", samples=every)
    tokens = every * 32
    assert float((all_in_order - all_drawn).norm() / all_in_order.norm()) <= sum_tolerance(tokens)
    with pytest.raises(Exception, match="--seed must be at least 0"):
        CalibrateConfig(seed=-1)


def test_default_collect_is_both_for_a_causal_lm_and_covariance_otherwise(tiny_llama, tiny_bert, lm_data, tmp_path):
    cfg = CalibrateConfig(samples=2, seq_len=24)
    assert cfg.collect is None
    causal = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "causal")
    manifest = json.loads((causal / "manifest.json").read_text())
    assert manifest["config"]["collect"] == ["covariance", "sensitivity"] and "sensitivity" in manifest["extra"]
    encoder = run_calibrate(str(tiny_bert), DataSpec(path=str(lm_data)), cfg, tmp_path / "encoder")
    manifest = json.loads((encoder / "manifest.json").read_text())
    assert manifest["config"]["collect"] == ["covariance"] and "sensitivity" not in manifest["extra"]


def test_merge_refuses_another_model(tiny_llama, tiny_llama_other, lm_data, tmp_path):
    from lrsurgery.calibration.stats_file import merge_stats
    from lrsurgery.errors import ArtifactError

    cfg = CalibrateConfig(samples=3, seq_len=32, batch_size=3)
    a = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "a")
    b = run_calibrate(str(tiny_llama_other), DataSpec(path=str(lm_data)), cfg, tmp_path / "b")
    with pytest.raises(ArtifactError, match="another model"):
        merge_stats([a, b], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_inspect_summary(tiny_llama, lm_data, tmp_path):
    from helpers import cli

    from lrsurgery.calibration.inspect import summarise

    stats = run_calibrate(
        str(tiny_llama), DataSpec(path=str(lm_data)), CalibrateConfig(samples=6, seq_len=32), tmp_path / "s"
    )
    rows = summarise(stats)
    assert len(rows) == 8  # 2 blocks x 4 distinct inputs
    for row in rows:
        cov = load_covariance(stats, row["covariance"]).double()
        # Σ eigenvalues (fp64 eigh of the same matrix) is the trace up to ~d·1e-16: any machine is far inside 1e-6
        assert row["trace"] == pytest.approx(float(cov.trace()), rel=1e-6)
        assert 1 <= row["effective_rank"] <= row["dim"] and row["condition"] >= 1
    qkv = next(r for r in rows if r["covariance"].endswith("q_proj"))
    assert [n.rsplit(".", 1)[-1] for n in qkv["shared_by"]] == ["k_proj", "q_proj", "v_proj"]
    code, out = cli("inspect", stats)
    assert code == 0 and "| layers.0.self_attn.q_proj | k_proj, q_proj, v_proj | 32 |" in out


@pytest.mark.parametrize("path", ["sequential", "whole"])
def test_calibrate_collects_sensitivity(tiny_llama, lm_data, tmp_path, path):
    """The artifact's sensitivities equal the whole-model computation on the same samples."""
    from lrsurgery.calibration.sensitivity import whole_model
    from lrsurgery.calibration.stats_file import load_sensitivity

    cfg = CalibrateConfig(
        samples=3, seq_len=24, collect=("covariance", "sensitivity"), sensitivity_path=path, shuffle=False
    )
    stats = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "s")
    got = load_sensitivity(stats)
    loaded = load_model(tiny_llama)
    rows = build_examples(DataSpec(path=str(lm_data), seq_len=24), loaded.tokenizer).rows[:3]
    samples = [collate([r], loaded.tokenizer.pad_token_id, "causal") for r in rows]
    expected = whole_model(loaded.model, samples, find_targets(loaded.model))
    assert len(got) == 14
    for name, value in got.items():  # the same fp32 per-sample gradients, summed over ≤ 3·24 tokens
        assert value == pytest.approx(float(expected[f"sens.{name}"]), rel=sum_tolerance(3 * 24))
    assert load_covariance(stats, "layers.0.mlp.up_proj").shape == (32, 32)


def test_sensitivity_needs_a_causal_lm(tiny_bert, lm_data, tmp_path):
    cfg = CalibrateConfig(samples=2, seq_len=24, collect=("sensitivity",))
    with pytest.raises(CalibrationError, match="causal language model"):
        run_calibrate(str(tiny_bert), DataSpec(path=str(lm_data)), cfg, tmp_path / "s")


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_bert"])
def test_disk_offload_gives_the_same_covariances(request, model_fixture, lm_data, tmp_path):
    """Blocks read from the safetensors one at a time give the covariances of the in-memory run."""
    folder = request.getfixturevalue(model_fixture)
    memory = run_calibrate(
        str(folder), DataSpec(path=str(lm_data)), CalibrateConfig(samples=4, seq_len=32), tmp_path / "cpu"
    )
    disk = run_calibrate(
        str(folder),
        DataSpec(path=str(lm_data)),
        CalibrateConfig(samples=4, seq_len=32, offload="disk"),
        tmp_path / "disk",
    )
    tokens = json.loads((memory / "manifest.json").read_text())["extra"]["tokens"]
    for file in sorted(memory.glob("block_*.safetensors")):
        a, b = load_tensors(file), load_tensors(disk / file.name)
        assert a.keys() == b.keys()
        for key in a:  # the same fp32 sums; only a kernel that depends on memory layout could reorder them
            assert float((a[key] - b[key]).double().norm() / a[key].double().norm()) <= sum_tolerance(tokens), key


def test_response_tokens_only(tiny_llama, bbc_small, tmp_path):
    """--tokens response: the covariance sums only the response tokens' activations."""
    from helpers import PROMPT, RESPONSE

    spec = DataSpec(path=str(bbc_small), seq_len=128, prompt_template=PROMPT, response_template=RESPONSE)
    cfg = CalibrateConfig(samples=4, seq_len=128, batch_size=2, tokens="response", shuffle=False)
    stats = run_calibrate(str(tiny_llama), spec, cfg, tmp_path / "s")
    loaded = load_model(tiny_llama)
    rows = build_examples(spec, loaded.tokenizer).rows[:4]
    name = "layers.1.mlp.down_proj"
    captured = []
    handle = backbone(loaded.model).get_submodule(name).register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        for row in rows:  # one sequence at a time: no padding at all
            loaded.model(input_ids=torch.tensor([row["input_ids"]]))
    handle.remove()
    x = torch.cat([h[0][torch.tensor(r["labels"]) != -100] for h, r in zip(captured, rows, strict=True)]).double()
    assert 0 < x.shape[0] < sum(len(r["input_ids"]) for r in rows)
    expected = x.T @ x / x.shape[0]
    got = load_covariance(stats, name).double()
    assert float((got - expected).norm() / expected.norm()) <= sum_tolerance(x.shape[0])
    with pytest.raises(CalibrationError, match="--tokens response needs prompt/response data"):
        run_calibrate(str(tiny_llama), DataSpec(path=str(bbc_small)), cfg, tmp_path / "t")


def test_inspect_ranks_sensitivity_and_draws_a_heatmap(tiny_llama, lm_data, tmp_path):
    from helpers import cli

    from lrsurgery.calibration.inspect import sensitivity_grid
    from lrsurgery.calibration.stats_file import load_sensitivity

    cfg = CalibrateConfig(samples=2, seq_len=24, collect=("sensitivity",))
    stats = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "s")
    values = load_sensitivity(stats)
    blocks, kinds, grid = sensitivity_grid(stats)
    assert blocks == ["0", "1"] and len(kinds) == 7 and "mlp.down_proj" in kinds
    assert float(grid[1, kinds.index("mlp.down_proj")]) == values["layers.1.mlp.down_proj"]
    code, out = cli("inspect", stats, "--top", 3, "--heatmap", tmp_path / "sens.png")
    best = max(values, key=values.get)
    assert code == 0 and f"| 1 | {best} |" in out and "| 4 |" not in out and "| covariance |" not in out
    png = (tmp_path / "sens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


@pytest.mark.parametrize("collect", [("covariance",), ("sensitivity",)])
def test_non_finite_activations_name_the_layer(tiny_llama, lm_data, tmp_path, collect):
    from transformers import AutoTokenizer

    model = load_model(tiny_llama).model
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "nan")
    cfg = CalibrateConfig(samples=2, seq_len=24, collect=collect)
    where = "layers.1.mlp.down_proj" if collect == ("covariance",) else "block layers.1 "
    with pytest.raises(CalibrationError, match=where):
        run_calibrate(str(tmp_path / "nan"), DataSpec(path=str(lm_data)), cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_reuse_keeps_a_calibration_of_the_same_model_data_and_settings(tiny_llama, tiny_llama_other, lm_data, tmp_path):
    """--reuse: the fingerprints decide, not the paths: the same rows under another file name are reused;
    another seed, other rows or another model are refused, and the artifact is left as it was."""
    import shutil

    cfg = CalibrateConfig(samples=3, seq_len=24, collect=("covariance",))
    stats = run_calibrate(str(tiny_llama), DataSpec(path=str(lm_data)), cfg, tmp_path / "stats")
    before = {f.name: f.stat().st_mtime_ns for f in stats.iterdir()}
    copy = tmp_path / "copy.jsonl"
    shutil.copy(lm_data, copy)
    run_calibrate(str(tiny_llama), DataSpec(path=str(copy)), cfg, stats, reuse=True)
    assert {f.name: f.stat().st_mtime_ns for f in stats.iterdir()} == before
    other_rows = write_jsonl(tmp_path / "other.jsonl", [json.loads(x) for x in lm_data.read_text().splitlines()[5:]])
    cases = [
        (tiny_llama, copy, {"seed": 1}, "other settings \\(seed\\)"),
        # the default --collect of a causal LM is both statistics: a covariance-only artifact is not that
        (tiny_llama, copy, {"collect": None}, "other settings \\(collect\\)"),
        (tiny_llama, other_rows, {}, "on other data"),
        (tiny_llama_other, copy, {}, "on another model"),
    ]
    for model, data, changes, message in cases:
        changed = replace(cfg, **changes)
        with pytest.raises(CalibrationError, match=message):
            run_calibrate(str(model), DataSpec(path=str(data)), changed, stats, reuse=True)
    assert {f.name: f.stat().st_mtime_ns for f in stats.iterdir()} == before
    fresh = run_calibrate(str(tiny_llama), DataSpec(path=str(copy)), cfg, tmp_path / "new", reuse=True)
    assert (fresh / "manifest.json").is_file()  # nothing there yet: it calibrates
    from helpers import cli

    for samples in (3, 2):
        args = ["--data", copy, "--samples", samples, "--seq-len", 24, "--collect", "covariance", "--reuse"]
        code, out = cli("calibrate", tiny_llama, *args, "-o", stats)
        if samples == 3:
            assert code == 0 and "already holds this calibration" in out and "wrote" not in out
        else:
            assert code == 1 and out.count("\n") == 1 and "other settings (samples)" in out
