"""`--preset NAME`: every shipped preset loads and each key is an option of its command; the precedence
flag > --config > --preset > default; the errors; `lrsurgery presets`; the preset in the init manifest.

The stages' work is replaced by a recorder of what the command line resolved to, so these tests run
the real commands (parsing, defaults, checks, the config dataclasses) without a model, except one init."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import cli

from lrsurgery.presets import STAGES, preset_names, preset_text
from lrsurgery.training.schedule import TrainConfig

PRESETS = preset_names()
SHIPPED = ["dmc-codefeedback", "dmc-commonsense", "dmc-metamath", "srlora-glue"] + [
    f"tlora-{task}" for task in ("commonsense", "glue", "math")
]


def preset(name: str) -> dict[str, Any]:
    """The parsed YAML of a shipped preset."""
    return yaml.safe_load(preset_text(name))


def key(option: str) -> str:
    """A preset key as the parameter name it sets (`max-steps` → `max_steps`)."""
    return option.lstrip("-").replace("-", "_")


@pytest.fixture
def resolved(monkeypatch) -> dict[str, dict[str, Any]]:
    """Run calibrate, init and train up to their stage's work: the work is replaced by a recorder of the
    values each command resolved, as {stage: {parameter name: value}}."""
    import lrsurgery.calibration.runner as calibration
    import lrsurgery.stages.init as init
    import lrsurgery.training.trainer as trainer

    seen: dict[str, dict[str, Any]] = {}

    def run_calibrate(model, data, cfg, out, **kwargs):
        seen["calibrate"] = {"model": model, **asdict(data), **asdict(cfg), **kwargs}
        return out

    def run_init(model, method, out, options, **kwargs):
        seen["init"] = {"model": model, "method": method, **kwargs, "options": options, **options}
        return out

    def run_train(init_dir, data, cfg, out, **kwargs):
        seen["train"] = {**asdict(data), **asdict(cfg), **kwargs, **kwargs["method_options"]}
        return out

    monkeypatch.setattr(calibration, "run_calibrate", run_calibrate)
    monkeypatch.setattr(init, "run_init", run_init)
    monkeypatch.setattr(trainer, "run_train", run_train)
    return seen


def run_stage(stage: str, tmp_path: Path, *args: Any) -> tuple[int, str]:
    """`lrsurgery STAGE` with its required arguments and `args`."""
    required = {
        "calibrate": ["calibrate", "some-model", "--data", tmp_path / "data.jsonl", "-o", tmp_path / "stats"],
        "init": ["init", "some-model", "-o", tmp_path / "init"],
        "train": ["train", tmp_path / "init", "--data", tmp_path / "data.jsonl", "-o", tmp_path / "run"],
    }[stage]
    return cli(*required, *args)


def one_error_line(code: int, output: str) -> str:
    """The single red line of a refused command (exit code 1, no traceback)."""
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


def test_the_papers_presets_are_shipped():
    assert PRESETS == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_preset_file_shape(name):
    data = preset(name)
    assert set(data) - set(STAGES) == {"description", "source"}, data.keys()
    for field in ("description", "source"):
        assert isinstance(data[field], str) and data[field].strip() and "\n" not in data[field]
    assert any(data.get(stage) for stage in STAGES)
    for stage in STAGES:
        assert isinstance(data.get(stage, {}), dict), stage


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_of_a_preset_is_taken_by_its_command(name, resolved, tmp_path):
    """Each stage the preset sets runs with it alone and resolves every key to the preset's value; the
    init and train method options together are accepted by the preset's method."""
    from lrsurgery.methods import get_method

    data = preset(name)
    for stage in STAGES:
        section = data.get(stage)
        if not section:
            continue
        length = [] if {"epochs", "max_steps"} & {key(k) for k in section} else ["--max-steps", "3"]
        code, output = run_stage(stage, tmp_path, "--preset", name, *(length if stage == "train" else []))
        assert code == 0, f"{name}, {stage}: {output}"
        got = resolved[stage]
        for option, value in section.items():
            found = got[key(option)]
            if isinstance(found, tuple):  # a comma-separated list on the command line
                found = ",".join(found)
            assert found == value, f"{name}, {stage}: {option} resolved to {found!r}, the preset sets {value!r}"
    init = resolved.get("init")
    if init is not None:
        train_options = resolved.get("train", {}).get("method_options", {})
        get_method(init["method"], **{**init["options"], **train_options})


@pytest.mark.parametrize("order", ["preset first", "config first"])
def test_flag_over_config_over_preset_over_default(order, resolved, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("lr: 1.0e-3\ngrad-accum: 2\n")  # the preset (tlora-math) sets lr 2e-5, grad_accum 32
    both = ["--preset", "tlora-math", "--config", config]
    if order == "config first":
        both = both[2:] + both[:2]
    default = {f.name: f.default for f in fields(TrainConfig)}
    assert default["lr"] not in (2e-5, 1e-3, 5e-4) and default["grad_accum"] not in (32, 2)

    assert run_stage("train", tmp_path, "--max-steps", "3")[0] == 0
    assert resolved["train"]["lr"] == default["lr"] and resolved["train"]["grad_accum"] == default["grad_accum"]

    assert run_stage("train", tmp_path, "--preset", "tlora-math")[0] == 0
    assert resolved["train"]["lr"] == 2e-5 and resolved["train"]["grad_accum"] == 32

    assert run_stage("train", tmp_path, *both)[0] == 0
    assert resolved["train"]["lr"] == 1e-3 and resolved["train"]["grad_accum"] == 2
    assert resolved["train"]["batch_size"] == 4 and resolved["train"]["epochs"] == 1  # the preset's, kept

    for flag_at in (0, 2, 4):  # the flag before, between and after the two
        args = [*both[:flag_at], "--lr", "5e-4", *both[flag_at:]]
        assert run_stage("train", tmp_path, *args)[0] == 0
        assert resolved["train"]["lr"] == 5e-4 and resolved["train"]["grad_accum"] == 2


@pytest.mark.parametrize("order", ["preset first", "config first"])
def test_method_options_follow_the_same_precedence(order, resolved, tmp_path):
    config = tmp_path / "init.yaml"
    config.write_text("rank: 64\n")  # the preset sets rank 128 and alpha 128
    both = ["--preset", "tlora-math", "--config", config]
    if order == "config first":
        both = both[2:] + both[:2]
    assert run_stage("init", tmp_path, *both)[0] == 0
    assert resolved["init"]["options"]["rank"] == 64 and resolved["init"]["options"]["alpha"] == 128
    assert resolved["init"]["method"] == "tlora" and resolved["init"]["preset"] == "tlora-math"
    assert run_stage("init", tmp_path, *both, "--rank", "16")[0] == 0
    assert resolved["init"]["options"]["rank"] == 16
    assert run_stage("init", tmp_path, "--rank", "16")[0] == 0
    assert resolved["init"]["options"] == {"rank": 16} and resolved["init"]["preset"] is None


def test_run_length_given_replaces_the_presets(resolved, tmp_path):
    """--max-steps on the command line or in --config replaces a preset's epochs (they exclude each other)."""
    assert run_stage("train", tmp_path, "--preset", "dmc-metamath", "--max-steps", "7")[0] == 0
    assert resolved["train"]["max_steps"] == 7 and resolved["train"]["epochs"] is None
    config = tmp_path / "train.yaml"
    config.write_text("max_steps: 9\n")
    assert run_stage("train", tmp_path, "--config", config, "--preset", "dmc-metamath")[0] == 0
    assert resolved["train"]["max_steps"] == 9 and resolved["train"]["epochs"] is None
    assert run_stage("train", tmp_path, "--preset", "dmc-metamath", "--epochs", "2")[0] == 0
    assert resolved["train"]["epochs"] == 2 and resolved["train"]["max_steps"] is None
    config.write_text("max_steps: 9\nepochs: 2\n")  # both from one source: refused as without a preset
    line = one_error_line(*run_stage("train", tmp_path, "--config", config, "--preset", "dmc-metamath"))
    assert "exactly one of --max-steps or --epochs" in line


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_preset(stage, resolved, tmp_path):
    line = one_error_line(*run_stage(stage, tmp_path, "--preset", "tlora-maths"))
    assert "unknown preset 'tlora-maths'" in line and all(name in line for name in SHIPPED)
    assert stage not in resolved


@pytest.mark.parametrize("name", ["srlora-glue", "dmc-metamath"])
def test_preset_without_a_section_for_the_command(name, resolved, tmp_path):
    line = one_error_line(*run_stage("calibrate", tmp_path, "--preset", name))
    assert f"preset {name} sets nothing for `lrsurgery calibrate`" in line and "without --preset" in line
    assert "calibrate" not in resolved


def test_init_method_other_than_the_presets(resolved, tmp_path):
    line = one_error_line(*run_stage("init", tmp_path, "--preset", "tlora-math", "--method", "lora"))
    assert "--preset tlora-math is for --method tlora" in line and "--method lora" in line
    config = tmp_path / "init.yaml"
    config.write_text("method: pissa\n")
    line = one_error_line(*run_stage("init", tmp_path, "--config", config, "--preset", "tlora-math"))
    assert "--preset tlora-math is for --method tlora" in line and "method: pissa in --config" in line
    assert "init" not in resolved
    assert run_stage("init", tmp_path, "--preset", "tlora-math", "--method", "tlora")[0] == 0


@pytest.mark.parametrize(
    ("section", "refusal"),
    [
        ("lrr: 1.0e-4", "--preset broken: unknown option 'lrr'; did you mean --lr?"),
        ("lr: fast", "--preset broken: 'lr': "),  # then the option type's own words
        ("lr: [1, 2]", "--preset broken: 'lr' must be a single value"),
    ],
)
def test_preset_keys_are_checked_as_config_keys(section, refusal, monkeypatch, resolved, tmp_path):
    from lrsurgery.cli import common

    monkeypatch.setattr(common, "preset_text", lambda name: f"train:\n  {section}\n" if name == "broken" else None)
    line = one_error_line(*run_stage("train", tmp_path, "--preset", "broken", "--max-steps", "3"))
    assert refusal in line


def test_presets_lists_every_preset():
    code, output = cli("presets")
    assert code == 0, output
    rows = [line for line in output.splitlines() if line.startswith("| ") and not line.startswith("| name")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == SHIPPED
    for row, name in zip(rows, SHIPPED, strict=True):
        assert preset(name)["source"] in row and preset(name)["description"] in row


@pytest.mark.parametrize("name", SHIPPED)
def test_presets_name_prints_the_file(name):
    code, output = cli("presets", name)
    assert code == 0 and output == preset_text(name)


def test_presets_unknown_name():
    line = one_error_line(*cli("presets", "nope"))
    assert "unknown preset 'nope'" in line and "dmc-metamath" in line


def test_init_records_the_preset(tiny_llama, tmp_path):
    code, output = cli("init", tiny_llama, "--preset", "dmc-commonsense", "--r-expert", "2", "-o", tmp_path / "init")
    assert code == 0, output
    config = json.loads((tmp_path / "init" / "manifest.json").read_text())["config"]
    assert config["preset"] == "dmc-commonsense" and config["method"] == "dual"
    assert config["options"]["r_share"] == 4 and config["options"]["r_expert"] == 2
    assert config["options"]["alpha"] == 32 and config["options"]["expert_dropout"] == 0.05


def test_train_records_its_preset_and_runs_the_papers_screening(tiny_llama, bbc_small, tmp_path):
    """A dual run from `--preset dmc-commonsense` on both stages: the train manifest names the preset and
    carries Table 1's screening settings (run length and batch given on the command line win)."""
    from helpers import PROMPT, RESPONSE

    code, output = cli("init", tiny_llama, "--preset", "dmc-commonsense", "-o", tmp_path / "init")
    assert code == 0, output
    data = ["--data", bbc_small, "--prompt-template", PROMPT, "--response-template", RESPONSE, "--seq-len", 48]
    args = ["--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "-o", tmp_path / "run"]
    code, output = cli("train", tmp_path / "init", "--preset", "dmc-commonsense", *data, *args)
    assert code == 0, output
    config = json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]
    assert config["train_preset"] == "dmc-commonsense" and config["preset"] == "dmc-commonsense"
    assert config["train"]["lr"] == 2e-5 and config["train"]["max_steps"] == 2 and config["train"]["epochs"] is None
    options = config["method_train_options"]
    assert options["t1"] == 0.2 and options["orth_weight"] == 0.3 and options["k_final"] == 3
    assert options["masking"] == "zero"
