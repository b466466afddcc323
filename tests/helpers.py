"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from typer.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # the shipped task and comparison files
PROMPT = "Article: {text}\nTopic:"
RESPONSE = " {label}"
SAMPLE_TEXTS = [
    "Shares in the bank rose sharply after the results were announced.",
    "The striker scored twice in the second half to win the cup final.",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def outputs(model: torch.nn.Module, tokenizer, texts: list[str] = SAMPLE_TEXTS) -> torch.Tensor:
    """Logits (or last hidden states of a bare encoder) for a padded batch of texts."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = model(**enc)
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return value * enc["attention_mask"][..., None] if value.ndim == 3 else value


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise |a − b|, computed in fp64 (exact for fp32 inputs)."""
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


FP32_UNIT = 2.0**-24  # unit roundoff of IEEE-754 single precision, the same on every machine
FP64_UNIT = 2.0**-53


def sum_tolerance(terms: int, unit: float = FP32_UNIT) -> float:
    """Relative difference allowed between two float sums of `terms` products that differ only in their
    order of summation (another machine's kernels, another batching): 8·√n·u, the probabilistic rounding
    bound of Higham & Mary (2019) with λ = 8, which holds for any order except with probability < 1e-13."""
    return 8 * math.sqrt(terms) * unit


# Two computations of the same function run in fp64 differ by fp64 rounding: about 1e-16 of the
# values' scale per operation, ≲1e-12 through a 30-layer model on any IEEE-754 machine (another order
# of operations changes the digits, not the size). 1e-9 of the scale leaves three orders of margin and
# is still 1e5 times below the fp32 rounding that the fp32 checks allow.
FP64_EXACT = 1e-9


def assert_same_function(got32, got64, want32, want64, what: str = "outputs") -> float:
    """Check that two models (or two ways of computing) give the same function, at the fp32 noise floor.

    `got64`/`want64` are the same two computations run in fp64. Their difference must be fp64 rounding
    (≤ FP64_EXACT × the outputs' scale): that is the exactness of the maths. The fp32 outputs may then
    differ by at most their own rounding, measured in this run on this machine's kernels: elementwise,
    |got32 − want32| ≤ |got32 − got64| + |got64 − want64| + |want64 − want32| (triangle inequality), so
    no tolerance measured on another CPU is needed. Returns the fp32 bound.
    """
    got32, got64, want32, want64 = (torch.as_tensor(t).double() for t in (got32, got64, want32, want64))
    scale = float(want64.abs().max())
    exact = max_abs(got64, want64)
    assert exact <= FP64_EXACT * scale, f"{what}: fp64 difference {exact:.3e} > {FP64_EXACT:g} × scale {scale:.3g}"
    # the three terms are each rounded once more when summed here: 1e-12 of the bound covers that
    bound = (max_abs(got32, got64) + exact + max_abs(want32, want64)) * (1 + 1e-12)
    found = max_abs(got32, want32)
    assert found <= bound, f"{what}: fp32 difference {found:.3e} > the fp32 rounding of the two ({bound:.3e})"
    return bound


def cli(*args) -> tuple[int, str]:
    """Run the lrsurgery CLI in-process; return (exit code, output). A traceback is a bug: re-raised."""
    from lrsurgery.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_same_tensors(file_a: Path, file_b: Path) -> None:
    """Two safetensors files hold the same names and bit-identical tensors."""
    from lrsurgery.io.artifacts import load_tensors

    a, b = load_tensors(file_a), load_tensors(file_b)
    assert a.keys() == b.keys(), (file_a, file_b)
    for key in a:
        assert torch.equal(a[key], b[key]), (file_a, key)


def assert_adapted_equals_base(artifact: Path, base_folder: Path, task: str = "causal") -> None:
    """An init artifact leaves the base model's function unchanged: the adapted model against the base
    model, in fp32 and fp64 (see assert_same_function)."""
    from lrsurgery.hf.load import load_model
    from lrsurgery.stages.adapted import load_adapted

    base = load_model(base_folder, task=task)
    tok = base.tokenizer
    assert_same_function(
        outputs(load_adapted(artifact, task=task)[0].model, tok),
        outputs(load_adapted(artifact, task=task, dtype=torch.float64)[0].model, tok),
        outputs(base.model, tok),
        outputs(load_model(base_folder, task=task, dtype=torch.float64).model, tok),
        f"{artifact.name} on {base_folder.name}",
    )


FEWSHOT = (  # a two-example few-shot block that prompts share (evaluation/prefix.py)
    "Article: The minister answered questions in parliament about the budget.\nTopic: politics\n\n"
    "Article: The striker scored twice in the cup final.\nTopic: sport\n\n"
)


def tokens_run(model) -> list[tuple[int, int]]:
    """A list that collects the (rows, tokens per row) of each forward of `model` (hook left in place)."""
    counts: list[tuple[int, int]] = []

    def count(_, args, kwargs):
        counts.append(tuple((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape))

    model.register_forward_pre_hook(count, with_kwargs=True)
    return counts
