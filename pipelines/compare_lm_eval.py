"""Score one task file with lm-evaluation-harness (HFLM, CPU, fp32) and with lrsurgery; compare.

Prints both metric tables and the largest per-request difference: log-likelihood per choice
(multiple_choice), per document (loglikelihood_rolling), or the number of identical generations
(generate_until). Needs `pip install lm_eval` (not a dependency of lrsurgery). The task file must be
one lm-eval can read: no ${VAR} in paths and no lrsurgery-only fields (pass --max-length instead of
the `max_length` field).

  python pipelines/compare_lm_eval.py TASK.yaml [--model smollm2-135m] [--limit 20] [--max-length N]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LRSURGERY_NO_PROGRESS", "1")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")

    import lm_eval
    from lm_eval.tasks import TaskManager

    from lrsurgery.evaluation.runner import score
    from lrsurgery.evaluation.tasks import Task
    from lrsurgery.hf.load import load_model
    from lrsurgery.hf.resolve import resolve_model

    task = Task.from_yaml(args.task)
    task.max_length = args.max_length
    model_args = {"pretrained": str(resolve_model(args.model)), "dtype": "float32"}
    if args.max_length:
        model_args["max_length"] = args.max_length
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[task.task],
        task_manager=TaskManager(include_path=str(args.task.parent)),
        limit=args.limit,
        batch_size=args.batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=1000,
    )
    ours = score(task, load_model(args.model), task.docs(args.limit), args.batch_size)
    print("lm-eval:   ", json.dumps({k: v for k, v in theirs["results"][task.task].items() if k != "alias"}))
    print("lrsurgery: ", json.dumps({k: v for k, v in ours.items() if k not in ("loglikelihoods", "generations")}))
    samples: dict[int, list] = {}
    for sample in theirs["samples"][task.task]:
        samples.setdefault(sample["doc_id"], sample["resps"])
    resps = [samples[i] for i in sorted(samples)]
    if task.output_type == "multiple_choice":
        diffs = [
            abs(a - float(r[0][0]))
            for q, rs in zip(ours["loglikelihoods"], resps, strict=True)
            for a, r in zip(q, rs, strict=True)
        ]
        print(f"max |log-likelihood difference| over {len(diffs)} choices: {max(diffs):.2e}")
    elif task.output_type == "loglikelihood_rolling":
        diffs = [abs(a - float(r[0][0])) for a, r in zip(ours["loglikelihoods"], resps, strict=True)]
        print(f"max |log-likelihood difference| over {len(diffs)} documents: {max(diffs):.2e}")
    else:
        same = sum(g[0] == r[0][0] for g, r in zip(ours["generations"], resps, strict=True))
        print(f"identical generations: {same} / {len(resps)}")


if __name__ == "__main__":
    main()
