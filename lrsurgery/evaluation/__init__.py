"""The `eval` stage: score models on tasks written as lm-evaluation-harness YAML files.

- tasks.py     YAML → Task, templates, few-shot contexts
- loglik.py    multiple_choice and loglikelihood_rolling
- generate.py  generate_until, filters, exact_match
- classify.py  classification heads (GLUE metrics)
- metrics.py   aggregation and standard errors
- code_exec.py pass@1 programs in subprocesses
- runner.py    models × tasks, results JSON, Markdown table
"""

from lrsurgery.evaluation.runner import markdown_table, run_eval, write_report
from lrsurgery.evaluation.tasks import Task, TaskError

__all__ = ["Task", "TaskError", "markdown_table", "run_eval", "write_report"]
