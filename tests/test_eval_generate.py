"""Eval, generation side: batched generate_until, GSM8K's filters, exact_match, pass@1 execution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, FEWSHOT, cli, tokens_run, write_jsonl

from lrsurgery.evaluation import generate as gen
from lrsurgery.evaluation.code_exec import run_program
from lrsurgery.evaluation.generate import apply_filters, cut_at_stop, exact_match, generate, regex_filter
from lrsurgery.evaluation.runner import run_eval
from lrsurgery.hf.load import load_model

TASKS = EXAMPLES / "tasks"
STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_EM = {"ignore_case": True, "ignore_punctuation": False, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}

# (response, strict-match extraction, flexible-extract extraction), worked out by hand from the regexes.
TRICKY = [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72", "72"),
    ("#### -3.5", "-3.5", "-3.5"),
    ("#### 1,234", "1,234", "1,234"),
    ("####42", "[invalid]", "42"),  # strict needs the space
    ("#### $5", "[invalid]", "$5"),  # '$' is not in strict's class; flexible keeps it
    ("#### 7\n#### 8", "7", "8"),  # strict takes the first match, flexible the last
    ("#### 12.", "12.", "12."),  # the trailing period survives extraction (exact_match strips it)
    ("She has 3 apples and 12 pears, so 15.", "[invalid]", "15."),
    ("The total is $1,200.", "[invalid]", "$1,200."),
    ("x = -7", "[invalid]", "-7"),  # one digit: only the second alternative matches
    ("Answer: 5", "[invalid]", "5"),
    ("1. First step 2. then 30", "[invalid]", "30"),
    ("no number at all", "[invalid]", "[invalid]"),
    ("", "[invalid]", "[invalid]"),
]


@pytest.mark.parametrize("response,strict,flexible", TRICKY)
def test_gsm8k_filters_extract_what_lm_eval_extracts(response, strict, flexible):
    assert regex_filter(response, STRICT) == strict
    assert regex_filter(response, FLEXIBLE, group_select=-1) == flexible
    steps = [{"function": "regex", "regex_pattern": STRICT}, {"function": "take_first"}]
    assert apply_filters(steps, [[response, "#### 0"]]) == [strict]


@pytest.mark.parametrize(
    "prediction,reference,options,expected",
    [
        ("$1,200.", "Step one... #### 1200", GSM8K_EM, 1.0),
        ("72", "Natalia sold 48/2 = 24 clips.\n#### 72", GSM8K_EM, 1.0),
        ("[invalid]", "#### 72", GSM8K_EM, 0.0),
        ("-3.5", "#### 3.5", GSM8K_EM, 0.0),
        ("Paris", "paris", {}, 0.0),
        ("Paris", "paris", {"ignore_case": True}, 1.0),
        ("paris!", "paris", {"ignore_punctuation": True}, 1.0),
        ("route 66", "route", {"ignore_numbers": True}, 0.0),  # the space stays
        ("route66", "route", {"ignore_numbers": True}, 1.0),
    ],
)
def test_exact_match_options(prediction, reference, options, expected):
    assert exact_match(prediction, reference, **options) == expected


def test_stop_strings_cut_at_the_first_occurrence():
    assert cut_at_stop("a\n\nb Question: c", ["Question:", "\n\n"]) == "a"
    assert cut_at_stop("no stop here", ["Question:", ""]) == "no stop here"


def test_normalized_kwargs_follow_lm_eval():
    until, budget, kwargs = gen.normalize_kwargs({"until": "\n", "temperature": 0.0}, eos="<|im_end|>")
    assert until == ["\n", "<|im_end|>"] and budget == 256 and kwargs == {"do_sample": False}
    until, budget, kwargs = gen.normalize_kwargs({"max_new_tokens": 9, "do_sample": True, "top_p": 0.9}, eos=None)
    assert until == [] and budget == 9 and kwargs == {"do_sample": True, "temperature": 1.0, "top_p": 0.9}


PROMPTS = [
    "Question: What is 2 + 3?\nAnswer:",
    "Once upon a time",
    "The capital of France is a city called",
    "def add(a, b):\n    return",
    "Q: Name a colour.\nA:",
]


def test_left_padded_batches_generate_what_one_at_a_time_does(tiny_llama):
    loaded = load_model(tiny_llama)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    single = [generate(loaded, [p], kwargs, batch_size=1, window=256)[0] for p in PROMPTS]
    assert generate(loaded, PROMPTS, kwargs, batch_size=4, window=256) == single
    assert any(single) and all("\n\n" not in s for s in single)


def test_prompts_sharing_a_few_shot_block_run_it_once_and_generate_what_each_does_alone(tiny_llama):
    """Greedy generation from a batch whose prompts share a few-shot block (run once, its cache copied
    into each batch) equals each prompt generated alone, from the whole prompt; in fp64, where no
    rounding of the other product shapes can flip a near-tie."""
    loaded = load_model(tiny_llama, dtype=torch.float64)
    prompts = [FEWSHOT + p for p in PROMPTS]
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    single = [generate(loaded, [p], kwargs, batch_size=1, window=256)[0] for p in prompts]
    counts = tokens_run(loaded.model)
    assert generate(loaded, prompts, kwargs, batch_size=2, window=256) == single
    block = len(loaded.tokenizer(FEWSHOT)["input_ids"]) - 1  # its last token may merge with the prompt's
    assert counts[0][0] == 1 and counts[0][1] >= block  # the block ran first, alone
    assert all(n < block for _, n in counts[1:])  # every batch ran only its prompts' own tokens
    assert any(single)


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_single_and_stops(smollm2):
    loaded = load_model(smollm2)
    kwargs = {"until": ["\n"], "max_gen_toks": 16}
    single = [generate(loaded, [p], kwargs, batch_size=1)[0] for p in PROMPTS]
    assert generate(loaded, PROMPTS, kwargs, batch_size=5) == single
    assert all("\n" not in s for s in single) and sum(len(s) > 3 for s in single) >= 3


def _gsm8k_rows(tmp_path) -> Path:
    rows = [
        {
            "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
        },
        {
            "question": "A box holds 12 eggs. How many eggs are in 5 boxes?",
            "answer": "5 * 12 = <<5*12=60>>60 eggs.\n#### 60",
        },
        {
            "question": "A car costs $1,200 a month. What does it cost for 2 months?",
            "answer": "2 * 1200 = <<2*1200=2400>>2400 dollars.\n#### 2,400",
        },
    ]
    write_jsonl(tmp_path / "test.jsonl", rows)
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"question": "What is 1 + 1?", "answer": "1 + 1 = 2.\n#### 2"},
            {"question": "What is 2 * 5?", "answer": "2 * 5 = 10.\n#### 10"},
            {"question": "What is 9 - 4?", "answer": "9 - 4 = 5.\n#### 5"},
        ],
    )
    return tmp_path


def test_gsm8k_task_scores_fixed_completions(tiny_llama, tmp_path, monkeypatch):
    """The shipped GSM8K file on hand-written rows; completions fixed, so the scores are known."""
    monkeypatch.setenv("GSM8K_DATA", str(_gsm8k_rows(tmp_path)))
    prompts_seen = []
    answers = ["3 + 4 = 7.\n#### 7", "Each box has 12 so the answer is 60", "So it costs $2,400.\n#### 2400."]

    def fake_generate(loaded, prompts, kwargs, batch_size, window):
        prompts_seen.extend(prompts)
        assert kwargs["until"] == ["Question:", "</s>", "<|im_end|>"]
        return answers

    monkeypatch.setattr(gen, "generate", fake_generate)
    report = run_eval([str(tiny_llama)], [TASKS / "gsm8k.yaml"], num_fewshot=2)
    got = report["results"][str(tiny_llama)]["gsm8k"]
    assert got["exact_match,strict-match"] == pytest.approx(2 / 3)  # the second has no '#### '
    assert got["exact_match,flexible-extract"] == pytest.approx(1.0)
    assert got["exact_match_stderr,strict-match"] == pytest.approx(1 / 3)  # sqrt(var([1, 0, 1]) / 3), var with n-1
    assert got["n"] == 3 and got["num_fewshot"] == 2
    first = prompts_seen[0]
    assert first.endswith("\n\nQuestion: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:")
    assert first.count("Question:") == 3 and first.count("#### ") == 2  # two worked examples, then the question


def test_gsm8k_task_runs_end_to_end_through_the_cli(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("GSM8K_DATA", str(_gsm8k_rows(tmp_path)))
    out, short = tmp_path / "r.json", tmp_path / "gsm8k_short.yaml"  # lm-eval `include`, then an override:
    short.write_text(
        f"include: {TASKS / 'gsm8k.yaml'}\ngeneration_kwargs:\n  until: ['Question:']\n  max_gen_toks: 24\n"
    )
    code, text = cli(
        "eval", tiny_llama, "--task", short, "--num-fewshot", 1, "--limit", 2, "--batch-size", 2, "-o", out
    )
    assert code == 0, text
    got = json.loads(out.read_text())["results"][str(tiny_llama)]["gsm8k"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(got) and got["n"] == 2
    assert "| gsm8k | exact_match,strict-match |" in text


def test_program_execution_passes_fails_and_times_out(tmp_path):
    assert run_program("assert sum([1, 2]) == 3\n")
    assert not run_program("assert sum([1, 2]) == 4\n")
    assert not run_program("while True:\n    pass\n", timeout=1.0)
    assert not run_program("open('escape.txt', 'w').write('x')\nraise SystemExit(1)\n")
    assert not (Path.cwd() / "escape.txt").exists()


def test_humaneval_pass_at_1_needs_the_flag_and_runs_programs(tiny_llama, tmp_path, monkeypatch):
    from lrsurgery.data.assets import humaneval

    data = tmp_path / "he"
    humaneval(data)
    monkeypatch.setenv("HUMANEVAL_DATA", str(data))
    code, text = cli("eval", tiny_llama, "--task", TASKS / "humaneval.yaml", "--limit", 2)
    assert code == 1 and "--allow-code-execution" in text and "Traceback" not in text
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()[:2]]
    completions = [rows[0]["canonical_solution"], "    return None\n"]  # right, wrong
    monkeypatch.setattr(gen, "generate", lambda *args, **kwargs: completions)
    report = run_eval([str(tiny_llama)], [TASKS / "humaneval.yaml"], limit=2, allow_code_execution=True)
    got = report["results"][str(tiny_llama)]["humaneval"]
    assert got["pass@1"] == 0.5 and got["n"] == 2
