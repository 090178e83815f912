"""The ``bakeedit`` command: a Click group whose commands only wire library calls together.

Each command lives in its own module of this package and is registered below.
"""

from __future__ import annotations

from bakeedit.cli.apply import apply_command
from bakeedit.cli.inspect import inspect_command
from bakeedit.cli.main import main
from bakeedit.cli.verify import verify_command

main.add_command(apply_command)
main.add_command(inspect_command)
main.add_command(verify_command)

__all__ = ["main"]
