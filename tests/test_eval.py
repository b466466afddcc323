"""Eval: lm-eval definitions of acc / acc_norm / perplexity, checked against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import write_jsonl

from lrsurgery.evaluate import Task, continuation_logprobs, encode_pair, run_eval, score_multiple_choice
from lrsurgery.models import load_model


def _task(tmp_path, data, **fields):
    spec = {
        "task": "t",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **fields,
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _direct(loaded, context, continuation):
    ctx, cont = encode_pair(loaded.tokenizer, context, continuation)
    ids = torch.tensor([list(ctx) + cont])
    logprobs = F.log_softmax(loaded.model(ids).logits.float(), -1)[0]
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@torch.no_grad()
def test_shared_context_scoring_equals_full_forward(tiny_llama):
    loaded = load_model(tiny_llama)
    requests = [
        ("The film won an award.\nTopic:", " entertainment"),
        ("The film won an award.\nTopic:", " tech"),
        ("Parliament voted ", "on the budget today"),
        ("", "An empty context"),
    ]
    got = continuation_logprobs(loaded, requests, "t")
    for (context, continuation), value in zip(requests, got, strict=True):
        assert value == pytest.approx(_direct(loaded, context, continuation), abs=1e-4)


@torch.no_grad()
def test_acc_and_acc_norm_follow_lm_eval(tiny_llama, tmp_path):
    """acc = argmax of summed log-prob; acc_norm = argmax of log-prob / len(choice string)."""
    loaded = load_model(tiny_llama)
    docs = [
        {"q": f"Question {i}: what is it?", "choices": ["a", "a much longer answer", "bc"], "gold": i % 3}
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    task = Task.from_yaml(
        _task(
            tmp_path,
            data,
            output_type="multiple_choice",
            doc_to_text="{{q}}",
            doc_to_choice="{{choices}}",
            doc_to_target="gold",
        )
    )
    result = score_multiple_choice(task, loaded, task.docs(), batch_size=4)
    acc, acc_norm = [], []
    for doc in docs:
        lls = [_direct(loaded, doc["q"], " " + c) for c in doc["choices"]]
        acc.append(max(range(3), key=lambda i: lls[i]) == doc["gold"])
        acc_norm.append(max(range(3), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["gold"])
    assert result["acc"] == pytest.approx(sum(acc) / 6)
    assert result["acc_norm"] == pytest.approx(sum(acc_norm) / 6)
    assert result["n"] == 6


@torch.no_grad()
def test_perplexity_matches_direct_loss(tiny_llama, tmp_path):
    loaded = load_model(tiny_llama)
    texts = ["To be, or not to be, that is the question. " * 3, "All the world's a stage."]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    report = run_eval(
        [str(tiny_llama)],
        [_task(tmp_path, data, output_type="loglikelihood_rolling", doc_to_target="text", max_length=256)],
    )
    metrics = report["results"][str(tiny_llama)]["t"]
    total, tokens = 0.0, 0
    for text in texts:  # each text fits in one 256-token window, so this is the exact reference
        ids = torch.tensor([[loaded.tokenizer.eos_token_id] + loaded.tokenizer(text)["input_ids"]])
        out = loaded.model(ids, labels=ids)
        total += float(out.loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert metrics["token_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    words = sum(len(t.split()) for t in texts)
    nbytes = sum(len(t.encode()) for t in texts)
    ll = math.log(metrics["token_perplexity"]) * tokens
    assert metrics["word_perplexity"] == pytest.approx(math.exp(ll / words), rel=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(ll / nbytes / math.log(2), rel=1e-6)


def test_template_with_absent_field_is_clear(tiny_llama, tmp_path):
    from lrsurgery.evaluate import TaskError

    data = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "gold": 0}])
    path = _task(
        tmp_path,
        data,
        output_type="multiple_choice",
        doc_to_text="{{question}}",
        doc_to_choice=["a", "b"],
        doc_to_target="gold",
    )
    with pytest.raises(TaskError, match="question"):
        run_eval([str(tiny_llama)], [path])
