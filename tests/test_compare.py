"""`lrsurgery compare`: every method on one setting, the results folder's structure, every reported number
traced back to the runs' own artifacts, resuming without retraining, and refusals."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import EXAMPLES, PROMPT, RESPONSE, cli

from lrsurgery.comparison.config import CompareError, read_comparison
from lrsurgery.comparison.runner import target_shapes
from lrsurgery.methods.base import registered

METHODS = ("lora", "pissa", "tlora", "dual", "srlora")


def _config(tmp_path: Path, model: Path, bbc: Path, bbc_small: Path, **changes) -> Path:
    setting = {
        "name": "tiny-bbc",
        "model": str(model),
        "data": {
            "train": str(bbc_small),
            "test": str(bbc / "test.jsonl"),
            "prompt_template": PROMPT,
            "response_template": RESPONSE,
            "seq_len": 48,
        },
        "calibrate": {"samples": 4, "seq_len": 32},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 5e-3, "eval_every": 2, "save_every": 4},
        "score": {"task": str(EXAMPLES / "tasks" / "bbc_topic.yaml"), "env": {"BBC_DATA": str(bbc)}, "metric": "acc"},
        "budget": {"rank": 4},
        "methods": {
            "lora": {},
            "pissa": {},
            "tlora": {},
            "dual": {"train": {"t1": 0.25, "t2": 0.5, "delta_t": 1}},
            "srlora": {"init": {"r_target": 8}},
        },
        "seeds": [0],
        **changes,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(setting, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def compared(tiny_llama, bbc, bbc_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    config = _config(folder, tiny_llama, bbc, bbc_small)
    code, output = cli("compare", config, "-o", folder / "results")
    assert code == 0, output
    return config, folder / "results", output


@pytest.mark.slow
def test_results_folder_holds_every_run_and_the_report(compared):
    _, out, output = compared
    _check_structure(out, output)


def _check_structure(out: Path, output: str) -> None:
    """The results folder holds every run's files, the tables, the report and (with matplotlib) its figures."""
    for name in ("lrsurgery_compare.json", "results.json", "table.md", "table.csv", "report.md", "base_score.json"):
        assert (out / name).is_file(), name
    assert (out / "stats" / "manifest.json").is_file()
    for method in METHODS:
        run = out / "runs" / method / "seed0"
        for part in ("init/manifest.json", "train/manifest.json", "train/metrics.jsonl", "score.json", "timing.json"):
            assert (run / part).is_file(), f"{method}: {part}"
        init = yaml.safe_load((run / "init.yaml").read_text())
        assert init["method"] == method and init["seed"] == 0
        assert yaml.safe_load((run / "train.yaml").read_text())["seed"] == 0
    assert "| lora |" in output and "| srlora |" in output  # the table is printed
    report = (out / "report.md").read_text()
    assert (out / "table.md").read_text().split("\n\n")[0] in report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'lrsurgery[plot]'" in report
    else:
        for figure in ("loss.png", "tlora_ranks.png", "srlora_intervals.png", "dual_experts.png"):
            assert (out / figure).read_bytes().startswith(b"\x89PNG") and f"]({figure})" in report


@pytest.mark.slow
def test_every_number_in_the_table_comes_from_the_runs_artifacts(compared):
    """Recompute each cell from the files the stages wrote, independently of comparison/report.py. The
    tolerances are the table's printed rounding (losses and scores to 4 decimals, the step time to 2, the
    init time to 1, MiB to 0): half a unit in the last printed place, whatever the machine."""
    _, out, _ = compared
    _check_table(out, eval_steps=(2, 4))


def _check_table(out: Path, eval_steps: tuple[int, ...]) -> None:
    """Every cell of `out`'s table.csv equals what the runs' own files hold (see the test above)."""
    with (out / "table.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    assert [r[0] for r in rows] == list(METHODS)
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        run = out / "runs" / row[0] / "seed0"
        manifest = json.loads((run / "train" / "manifest.json").read_text())
        assert int(cells["trainable parameters"]) == manifest["extra"]["trainable_parameters"]
        lines = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
        for record in lines:
            if "eval_loss" in record:
                assert float(cells[f"held-out loss @ {record['step']}"]) == pytest.approx(record["eval_loss"], abs=5e-5)
        assert {f"held-out loss @ {s}" for s in eval_steps} <= set(cells)
        (results,) = json.loads((run / "score.json").read_text())["results"].values()
        acc = results["bbc_topic"]
        value, stderr = (float(x) for x in cells[next(h for h in header if h.startswith("acc"))].split(" ± "))
        assert value == pytest.approx(acc["acc"], abs=5e-5) and stderr == pytest.approx(acc["acc_stderr"], abs=5e-5)
        steps = [r["step_time"] for r in lines[1:]]
        assert float(cells["train step s"]) == pytest.approx(statistics.median(steps), abs=5e-3)
        timing = json.loads((run / "timing.json").read_text())
        assert float(cells["init s"]) == pytest.approx(timing["init_seconds"], abs=0.05)
        assert float(cells["peak RSS MiB"]) == pytest.approx(manifest["extra"]["peak_memory_mb"]["rss"], abs=0.5)


@pytest.mark.slow
def test_the_shipped_setting_1_at_its_quick_size_runs_every_method_on_the_real_model(tmp_path):
    """`lrsurgery compare examples/compare/smollm2-bbc-topics.yaml --quick` as a user runs it: SmolLM2-135M
    and the real BBC News data, every method; the folder it writes and every number of its table read
    back from the runs' own files."""
    config = EXAMPLES / "compare" / "smollm2-bbc-topics.yaml"
    code, output = cli("compare", config, "--quick", "-o", tmp_path / "results")
    assert code == 0, output
    _check_structure(tmp_path / "results", output)
    _check_table(tmp_path / "results", eval_steps=(3, 6))


@pytest.mark.slow
def test_equal_budget(compared, tiny_llama):
    """Every method near LoRA rank 4's trainable count: TLoRA's rank budget grows as only B trains."""
    _, out, _ = compared
    shapes = target_shapes(str(tiny_llama))
    lora = sum(4 * (d_in + d_out) for d_out, d_in in shapes.values())
    counts = {}
    for method in METHODS:
        manifest = json.loads((out / "runs" / method / "seed0" / "train" / "manifest.json").read_text())
        counts[method] = manifest["extra"]["trainable_parameters"]
    assert counts["lora"] == counts["pissa"] == counts["srlora"] == lora
    assert counts["dual"] == lora + 2 * len(shapes)  # + the gates E (r_expert = 2 per module)
    assert registered()["tlora"].budget_options(4, shapes)["rank"] > 4
    assert abs(counts["tlora"] - lora) / lora < 0.25  # the allocation moves ranks between module shapes


@pytest.mark.slow
def test_running_again_trains_nothing_and_a_new_seed_runs_only_itself(compared, tiny_llama, bbc, bbc_small, tmp_path):
    """The same setting with two of its methods and a second seed: the finished seed-0 runs and the
    calibration are kept as they are, only the two new runs are made, and the report covers those methods."""
    _, out, _ = compared
    adapter = "train/adapter.safetensors"
    before = {m: (out / "runs" / m / "seed0" / adapter).stat().st_mtime_ns for m in METHODS}
    stats = (out / "stats" / "manifest.json").stat().st_mtime_ns
    full = yaml.safe_load(_config(tmp_path, tiny_llama, bbc, bbc_small).read_text())
    two = _config(tmp_path, tiny_llama, bbc, bbc_small, methods={m: full["methods"][m] for m in ("lora", "tlora")})
    code, output = cli("compare", two, "-o", out, "--seeds", "0,1")
    assert code == 0, output
    assert all((out / "runs" / m / "seed0" / adapter).stat().st_mtime_ns == before[m] for m in METHODS)
    assert (out / "stats" / "manifest.json").stat().st_mtime_ns == stats
    made = sorted(p.parent.name for p in (out / "runs").glob("*/seed1"))
    assert made == ["lora", "tlora"] and all((out / "runs" / m / "seed1" / "score.json").is_file() for m in made)
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in results["runs"]) == [(m, s) for m in made for s in (0, 1)]
    assert "mean ± std over seeds" in (out / "table.md").read_text()


@pytest.mark.slow
def test_a_file_that_extends_the_setting_adds_a_variant_and_runs_only_it(compared, tmp_path):
    """An ablation file `extends` the comparison's file and adds `tlora-w` (TLoRA with A from W): run into
    the same folder, only the variant's run is made, from TLoRA with its own option, and the table and the
    results hold it beside the methods already there."""
    config, out, _ = compared
    adapter = "train/adapter.safetensors"
    before = {m: (out / "runs" / m / "seed0" / adapter).stat().st_mtime_ns for m in METHODS}
    (tmp_path / "ablations").mkdir()
    ablation = tmp_path / "ablations" / "variant.yaml"
    ablation.write_text(
        f"extends: {os.path.relpath(config, ablation.parent)}\n"
        "methods:\n  tlora-w: {method: tlora, init: {a_init: w}}\nseeds: [0]\n"
    )
    assert Path(read_comparison(ablation).source) == ablation.resolve()
    code, output = cli("compare", ablation, "-o", out)
    assert code == 0, output
    assert all((out / "runs" / m / "seed0" / adapter).stat().st_mtime_ns == before[m] for m in METHODS)
    init = yaml.safe_load((out / "runs" / "tlora-w" / "seed0" / "init.yaml").read_text())
    assert init["method"] == "tlora" and init["a_init"] == "w"
    manifest = json.loads((out / "runs" / "tlora-w" / "seed0" / "init" / "manifest.json").read_text())
    assert manifest["config"]["method"] == "tlora" and manifest["config"]["options"]["a_init"] == "w"
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["kind"]) for r in results["runs"]} == {(m, m) for m in METHODS} | {("tlora-w", "tlora")}
    assert "| tlora-w |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_the_task_file_is_pinned_by_its_content_not_its_path(compared, tiny_llama, bbc, bbc_small, tmp_path):
    """A checkout moved elsewhere takes up its comparisons: the same task file at another path runs (and
    trains nothing), while an edited one is refused as another setting."""
    _, out, _ = compared
    adapter = out / "runs" / "lora" / "seed0" / "train" / "adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    moved = tmp_path / "moved" / "bbc_topic.yaml"
    moved.parent.mkdir()
    moved.write_bytes((EXAMPLES / "tasks" / "bbc_topic.yaml").read_bytes())
    score = {"task": str(moved), "env": {"BBC_DATA": str(bbc)}, "metric": "acc"}
    code, output = cli("compare", _config(tmp_path, tiny_llama, bbc, bbc_small, score=score), "-o", out)
    assert code == 0, output
    assert adapter.stat().st_mtime_ns == before
    moved.write_text(moved.read_text() + "\n# edited\n")
    code, output = cli("compare", _config(tmp_path, tiny_llama, bbc, bbc_small, score=score), "-o", out)
    assert code == 1 and "other settings (score)" in output


@pytest.mark.slow
def test_a_classification_setting_scores_the_trained_heads_and_no_base_model(tiny_bert, bbc, tmp_path):
    setting = {
        "name": "tiny-classify",
        "model": str(tiny_bert),
        "data": {"train": str(bbc / "train.jsonl"), "test": str(bbc / "test.jsonl"), "task": "classification"},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "seq_len": 32},
        "score": {"task": str(EXAMPLES / "tasks" / "bbc_topic_classify.yaml"), "env": {"BBC_DATA": str(bbc)}},
        "budget": {"rank": 2},
        "methods": {"lora": {}},
        "seeds": [0],
    }
    setting["score"]["metric"] = "acc"
    config = tmp_path / "classify.yaml"
    config.write_text(yaml.safe_dump(setting))
    code, output = cli("compare", config, "-o", tmp_path / "out")
    assert code == 0, output
    out = tmp_path / "out"
    assert not (out / "base_score.json").exists()
    assert "The base model is not scored" in (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    scored = json.loads((out / "runs" / "lora" / "seed0" / "score.json").read_text())["results"]
    assert results["base"]["acc"] is None
    assert results["runs"][0]["acc"] == next(iter(next(iter(scored.values())).values()))["acc"]


@pytest.mark.slow
def test_refusals(compared, tiny_llama, bbc, bbc_small, tmp_path):
    config, out, _ = compared
    other = _config(tmp_path, tiny_llama, bbc, bbc_small, train={"max_steps": 5, "batch_size": 2})
    code, output = cli("compare", other, "-o", out)
    assert code == 1 and "other settings (train)" in output
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    code, output = cli("compare", config, "-o", user)
    assert code == 1 and "not an lrsurgery comparison" in output and (user / "notes.txt").read_text() == "keep me"
    code, output = cli("compare", config, "-o", tmp_path / "x", "--seeds", "0,a")
    assert code == 1 and "--seeds takes comma-separated whole numbers" in output
    bad = _config(tmp_path, tiny_llama, bbc, bbc_small, methods={"nope": {}})
    with pytest.raises(CompareError, match="unknown method 'nope'"):
        read_comparison(bad)
    bad = _config(tmp_path, tiny_llama, bbc, bbc_small, methods={"x": {"method": "nope"}})
    with pytest.raises(CompareError, match="methods.x: unknown method 'nope'"):
        read_comparison(bad)
    bad = _config(tmp_path, tiny_llama, bbc, bbc_small, methods={"../x": {"method": "lora"}})
    with pytest.raises(CompareError, match="it names a folder"):
        read_comparison(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(CompareError, match="'extends' makes a loop"):
        read_comparison(loop)


@pytest.mark.parametrize(
    "name", ["smollm2-bbc-topics", "minilm-bbc-topics", "smollm2-shakespeare", "smollm2-bbc-ablations"]
)
def test_shipped_comparisons_read_in_both_sizes(name):
    full = read_comparison(EXAMPLES / "compare" / f"{name}.yaml")
    quick = read_comparison(EXAMPLES / "compare" / f"{name}.yaml", quick=True)
    assert set(full.methods) >= set(METHODS) and len(full.seeds) == 3 and quick.seeds == [0]
    assert {full.method_of(label) for label in full.methods} == set(METHODS)
    assert quick.train["max_steps"] < full.train["max_steps"] and Path(full.score["task"]).is_file()


def test_the_ablation_file_shares_setting_1_and_adds_the_papers_variants():
    base = read_comparison(EXAMPLES / "compare" / "smollm2-bbc-topics.yaml")
    ablations = read_comparison(EXAMPLES / "compare" / "smollm2-bbc-ablations.yaml")
    for key in ("name", "model", "data", "calibrate", "train", "score", "budget", "seeds"):
        assert getattr(ablations, key) == getattr(base, key), key
    assert {label: ablations.methods[label] for label in base.methods} == base.methods
    variants = {label: (ablations.method_of(label), entry["init"]) for label, entry in ablations.methods.items()}
    assert variants["tlora-w"] == ("tlora", {"a_init": "w"}) and variants["tlora-random"][1] == {"a_init": "random"}
    assert variants["dual-shared-only"] == ("dual", {"ablation": "shared-only"})


def test_score_settings_are_checked_before_anything_runs_and_the_device_reaches_eval(
    tiny_llama, bbc, bbc_small, tmp_path, monkeypatch
):
    from lrsurgery.comparison import runner

    score = {"task": str(EXAMPLES / "tasks" / "bbc_topic.yaml"), "metric": "acc"}
    for extra, message in (({"limt": 5}, "score.limt is not a setting"), ({"device": "tpu"}, "score.device: ")):
        with pytest.raises(CompareError, match=message):
            read_comparison(_config(tmp_path, tiny_llama, bbc, bbc_small, score={**score, **extra}))
    comparison = read_comparison(_config(tmp_path, tiny_llama, bbc, bbc_small, score={**score, "device": "cpu"}))
    calls = []
    monkeypatch.setattr(runner, "lrsurgery", lambda *args, env=None: calls.append([str(a) for a in args]))
    runner._score(comparison, tmp_path, str(tiny_llama), tmp_path / "score.json")
    assert calls[0][calls[0].index("--device") + 1] == "cpu"
