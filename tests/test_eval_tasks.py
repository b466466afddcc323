"""Eval task files: lm-eval field semantics, few-shot contexts, GLUE metrics, and one-line errors."""

from __future__ import annotations

from random import Random

import pytest
import torch
import yaml
from helpers import cli, write_jsonl

from lrsurgery.evaluation import metrics
from lrsurgery.evaluation.runner import run_eval
from lrsurgery.evaluation.tasks import Task, TaskError, contexts
from lrsurgery.hf.load import load_model

TRAIN = [{"q": f"train question {i}", "a": f"answer {i}", "gold": i % 2} for i in range(6)]
TEST = [{"q": f"test question {i}", "a": f"answer {i}", "gold": i % 2} for i in range(4)]


def _write(tmp_path, name="task.yaml", test=TEST, **fields):
    files = {"test": str(write_jsonl(tmp_path / "test.jsonl", test))}
    if test is TEST:
        files["train"] = str(write_jsonl(tmp_path / "train.jsonl", TRAIN))
    spec = {
        "task": "t",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Q: {{q}}\nA:",
        "doc_to_target": "a",
        **fields,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_fewshot_context_is_lm_eval_format_with_seed_1234(tmp_path):
    task = Task.from_yaml(_write(tmp_path, fewshot_split="train", description="Answer briefly.\n\n"), num_fewshot=2)
    got = contexts(task, TEST[:2])
    rnd = Random(1234)  # lm-eval: one Random(fewshot seed) per task, sampled in document order
    for doc, context in zip(TEST[:2], got, strict=True):
        shots = rnd.sample(TRAIN, 2)
        expected = "Answer briefly.\n\n" + "".join(f"Q: {s['q']}\nA: {s['a']}\n\n" for s in shots)
        assert context == expected + f"Q: {doc['q']}\nA:"
    assert contexts(task, TEST[:2]) == got  # deterministic


def test_fewshot_from_the_evaluated_split_never_shows_the_document_itself(tmp_path):
    task = Task.from_yaml(_write(tmp_path, fewshot_split="test"), num_fewshot=3)
    for doc, context in zip(TEST, contexts(task, TEST), strict=True):
        assert context.count("Q: ") == 4 and context.count(f"Q: {doc['q']}") == 1
    first_n = Task.from_yaml(
        _write(tmp_path, fewshot_split="train", fewshot_config={"sampler": "first_n"}), num_fewshot=2
    )
    assert contexts(first_n, TEST[:1])[0].startswith("Q: train question 0\nA: answer 0\n\nQ: train question 1\n")


def test_multiple_choice_fewshot_shows_the_choice_text(tmp_path):
    path = _write(
        tmp_path,
        output_type="multiple_choice",
        doc_to_choice=["no", "yes"],
        doc_to_target="gold",
        training_split="train",
        target_delimiter=" =>",
        fewshot_delimiter="\n---\n",
    )
    task = Task.from_yaml(path, num_fewshot=1)
    context = contexts(task, TEST[:1])[0]
    shown = next(d for d in TRAIN if context.startswith(f"Q: {d['q']}\n"))
    assert context == f"Q: {shown['q']}\nA: =>{['no', 'yes'][shown['gold']]}\n---\nQ: test question 0\nA:"


def test_target_and_choice_semantics(tmp_path):
    task = Task.from_yaml(
        _write(
            tmp_path,
            output_type="multiple_choice",
            doc_to_choice="{{ ['x', 'y', 'z'] }}",
            doc_to_target="{{ gold + 1 }}",
        )
    )
    doc = {"q": "?", "gold": 1}
    assert task.choices(doc) == ["x", "y", "z"] and task.target(doc) == 2  # a digit string is an index
    assert task.gold_indices({"q": "?", "gold": 0}, ["x", "y", "z"]) == [1]
    by_name = Task.from_yaml(
        _write(tmp_path, output_type="multiple_choice", doc_to_choice=["x", "y"], doc_to_target="{{ 'y' }}")
    )
    assert by_name.gold_indices(doc, ["x", "y"]) == [1]
    text = Task.from_yaml(_write(tmp_path, doc_to_text="{{q}}\n"))
    assert text.text({"q": "a"}) == "a\n"  # keep_trailing_newline, as lm-eval renders


def test_defaults_follow_lm_eval(tmp_path):
    task = Task.from_yaml(_write(tmp_path))
    assert task.target_delimiter == " " and task.fewshot_delimiter == "\n\n"
    assert task.generation_kwargs == {"do_sample": False, "temperature": 0.0, "until": ["\n\n"]}
    assert task.metrics == [{"metric": "exact_match"}]
    other = Task.from_yaml(_write(tmp_path, generation_kwargs={"max_gen_toks": 5}, fewshot_delimiter="###"))
    assert other.generation_kwargs == {"max_gen_toks": 5, "until": ["###"]}
    assert Task.from_yaml(_write(tmp_path), num_fewshot=3).config_hash != task.config_hash


def test_glue_metrics_by_hand():
    golds, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert metrics.f1(golds, preds) == pytest.approx(4 / 6)
    assert metrics.mcc(golds, preds) == pytest.approx((2 * 1 - 1 * 1) / (3 * 3 * 2 * 2) ** 0.5)
    assert metrics.f1_macro(golds, preds) == pytest.approx((4 / 6 + 2 / 4) / 2)  # class 0: tp 1, fp 1, fn 1
    assert metrics.mcc([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert metrics.mcc([1, 1, 1], [1, 1, 1]) == 0.0  # undefined → 0, as sklearn
    assert metrics.pearson([1, 2, 3, 4], [2, 4, 6, 9]) == pytest.approx(11.5 / (5 * 26.75) ** 0.5)
    assert metrics.spearman([1, 2, 3, 4], [2, 4, 6, 9]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)  # tied ranks 2.5
    assert metrics.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.75 / 3 / 4) ** 0.5)  # Σ(x-x̄)² = 0.75
    assert metrics.mean_stderr([1.0]) is None
    assert metrics.bootstrap_stderr(metrics.f1, list(zip(golds, preds, strict=True))) > 0


@torch.no_grad()
def test_classification_head_metrics_equal_direct_argmax(tiny_bert, tmp_path):
    rows = [{"s": f"sentence number {i} " * (1 + i % 3), "label": i % 2} for i in range(7)]
    path = _write(
        tmp_path,
        test=rows,
        output_type="classification",
        doc_to_text="s",
        doc_to_target="label",
        metric_list=[{"metric": m} for m in ("acc", "f1", "mcc")],
    )
    loaded = load_model(tiny_bert, task="classification", num_labels=2)  # a fresh random head, saved with it
    folder = tmp_path / "classifier"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    got = run_eval([str(folder)], [path], batch_size=3)["results"][str(folder)]["t"]
    preds = [int(loaded.model(**loaded.tokenizer(r["s"], return_tensors="pt")).logits.argmax()) for r in rows]
    golds = [r["label"] for r in rows]
    assert got["acc"] == pytest.approx(sum(p == g for p, g in zip(preds, golds, strict=True)) / 7)
    assert got["f1"] == pytest.approx(metrics.f1(golds, preds)) and got["mcc"] == pytest.approx(
        metrics.mcc(golds, preds)
    )
    assert got["f1_stderr"] is not None and got["n"] == 7


@pytest.mark.parametrize(
    "fields,test,message",
    [
        ({"doc_to_text": "{{question}}"}, TEST, "question"),
        ({"output_type": "multiple_choice", "doc_to_choice": ["only"], "doc_to_target": 0}, TEST, "at least two"),
        ({}, [], "split .test. is empty"),
        (
            {
                "output_type": "multiple_choice",
                "doc_to_choice": ["a", "b"],
                "doc_to_target": "gold",
                "metric_list": [{"metric": "exact_match"}],
            },
            TEST,
            "does not fit output_type multiple_choice",
        ),
        ({"output_type": "loglikelihood_rolling", "metric_list": [{"metric": "acc"}]}, TEST, "does not fit"),
        (
            {"output_type": "multiple_choice", "doc_to_choice": ["a", "b"], "doc_to_target": "a"},
            TEST,
            "neither a choice index",
        ),
        ({"output_type": "summarise"}, TEST, "not one of"),
        ({"process_docs": "x"}, TEST, "not supported"),
    ],
)
def test_bad_tasks_fail_with_one_clear_line(tiny_llama, tmp_path, fields, test, message):
    path = _write(tmp_path, test=test, **fields)
    with pytest.raises(TaskError, match=message):
        run_eval([str(tiny_llama)], [path])
    code, text = cli("eval", tiny_llama, "--task", path)
    assert code == 1 and text.startswith("error: ") and len(text.strip().splitlines()) == 1


def test_a_missing_model_is_refused_before_any_model_is_scored(tiny_llama, tmp_path, monkeypatch):
    from lrsurgery.evaluation import runner

    scored = []
    monkeypatch.setattr(runner, "score", lambda *args, **kwargs: scored.append(args))
    code, text = cli("eval", tiny_llama, tmp_path / "no-such-run", "--task", _write(tmp_path), "-o", tmp_path / "r")
    assert code == 1 and "no-such-run" in text and len(text.strip().splitlines()) == 1
    assert scored == [] and not (tmp_path / "r").exists()


def test_lm_eval_python_hooks_are_refused(tmp_path):
    path = _write(tmp_path)
    path.write_text(path.read_text() + "process_results: !function utils.process_results\n")
    with pytest.raises(TaskError, match="!function utils.process_results"):
        Task.from_yaml(path)


def test_generation_task_on_an_encoder_is_refused(tiny_bert, tmp_path):
    code, text = cli("eval", tiny_bert, "--task", _write(tmp_path))
    assert code == 1 and "needs a causal language model" in text


def test_fewshot_without_enough_examples_is_clear(tiny_llama, tmp_path):
    path = _write(tmp_path, fewshot_split="train")
    code, text = cli("eval", tiny_llama, "--task", path, "--num-fewshot", 7)
    assert code == 1 and "only 6 documents" in text
