"""Benchmark: multiple-choice scoring throughput, shared context vs one sequence per choice.

Same model, same BBC News questions, same batch size, same process: the shared-context path runs each
question's context once and scores its five topic words from the key/value cache; the naive path runs
context + choice as its own sequence for every choice (lm-eval's way). Both are timed after a warm-up,
alternating, and must agree on every log-likelihood.

  flock /tmp/lrsurgery-bench.lock python pipelines/bench_eval.py [--model smollm2-135m] [--questions 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

TASK = Path(__file__).resolve().parent.parent / "examples" / "tasks" / "bbc_topic.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LRSURGERY_NO_PROGRESS", "1")

    import torch

    from lrsurgery.data.assets import bbc_news
    from lrsurgery.evaluation.loglik import score_multiple_choice
    from lrsurgery.evaluation.tasks import Task
    from lrsurgery.hf.load import load_model

    data = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    bbc_news(data)
    os.environ["BBC_DATA"] = str(data)
    task = Task.from_yaml(TASK)
    docs = task.docs(args.questions)
    loaded = load_model(args.model)
    print(
        f"model {args.model}, {len(docs)} BBC questions x 5 choices, batch {args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    score_multiple_choice(task, loaded, docs[:4], args.batch_size, share_context=True)  # warm-up
    score_multiple_choice(task, loaded, docs[:4], args.batch_size, share_context=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for shared in (True, False):
            began = time.perf_counter()
            results[shared] = score_multiple_choice(task, loaded, docs, args.batch_size, share_context=shared)
            times[shared].append(time.perf_counter() - began)
    rate = {k: len(docs) / statistics.median(v) for k, v in times.items()}
    worst = max(
        abs(a - b)
        for qa, qb in zip(results[True]["loglikelihoods"], results[False]["loglikelihoods"], strict=True)
        for a, b in zip(qa, qb, strict=True)
    )
    print("| path | questions/s | acc | acc_norm |")
    print("|---|---|---|---|")
    for shared, name in ((True, "shared context (KV cache)"), (False, "naive: one sequence per choice")):
        r = results[shared]
        print(f"| {name} | {rate[shared]:.2f} | {r['acc']:.4f} | {r['acc_norm']:.4f} |")
    print(
        f"speed-up (shared / naive): {rate[True] / rate[False]:.2f}x; "
        f"max |log-likelihood difference| between the paths: {worst:.2e}"
    )


if __name__ == "__main__":
    main()
