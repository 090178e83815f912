"""``python -m bakeedit.cli``: the CLI for launchers that want a module (``torchrun -m bakeedit.cli locate ...``)."""

from bakeedit.cli import main

main()
