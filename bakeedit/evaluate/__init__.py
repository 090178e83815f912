"""Evaluation: a batched scorer, bias and capability tasks with the metrics their papers define, and reports."""

from bakeedit.evaluate.engine import LLResult, Scorer
from bakeedit.evaluate.tasks.base import (
    MetricValue,
    Task,
    TaskData,
    TaskResult,
    UnknownTaskError,
    available_tasks,
    bootstrap_stderr,
    get_task,
    register_task,
    resolve_source,
    sample_items,
)

__all__ = [
    "LLResult",
    "MetricValue",
    "Scorer",
    "Task",
    "TaskData",
    "TaskResult",
    "UnknownTaskError",
    "available_tasks",
    "bootstrap_stderr",
    "get_task",
    "register_task",
    "resolve_source",
    "sample_items",
]

# --- reports / CLI helpers (added by the reports helper below this line) ---
from bakeedit.evaluate.runner import EvalRun, evaluate_models, run_tasks, with_runtime_edit  # noqa: F401
