"""Locate methods: each turns a model (and its data) into a :class:`~bakeedit.neurons.NeuronSet`.

A method is a module of this package registered with :func:`register`; it declares a pydantic ``Params`` schema
(validated from the recipe's ``locate:`` block, so a typo names the field) and a ``run`` function.
"""

from bakeedit.locate.registry import (
    LocateContext,
    LocateMethod,
    available_methods,
    get_method,
    register,
    run_locate,
)

__all__ = ["LocateContext", "LocateMethod", "available_methods", "get_method", "register", "run_locate"]
