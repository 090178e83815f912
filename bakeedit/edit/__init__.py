"""Edits: a validated plan, its runtime hooks, and its fold into the weights."""

from bakeedit.edit.fold import fold_plan
from bakeedit.edit.hooks import runtime_edit
from bakeedit.edit.plan import EditPlan, ResponseGroup, ScaleGroup, build_plan

__all__ = ["EditPlan", "ResponseGroup", "ScaleGroup", "build_plan", "fold_plan", "runtime_edit"]
