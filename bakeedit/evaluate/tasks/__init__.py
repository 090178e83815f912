"""Every task module is imported here so that its ``@register_task`` runs; add one line per new module."""

# ruff: noqa: F401, I001  (imported for their registration side effect; grouped by owner, not sorted)
from bakeedit.evaluate.tasks import base

# --- capability tasks ---
from bakeedit.evaluate.tasks import arc, copa, gsm8k, hellaswag, mmlu, openbookqa, perplexity, piqa, winogrande

# --- bias tasks (added by the bias helper below this line) ---
from bakeedit.evaluate.tasks import bbq, crows_pairs, probes, stereoset, winogender
