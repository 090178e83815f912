"""Workflows: ``apply`` (recipe -> neurons -> plan -> bake -> verify -> evaluate -> card), its evaluation step,
``sweep`` and its Pareto front. The only modules that compose the stages (locate, edit, export, evaluate); the CLI
calls one workflow or library function per command."""
