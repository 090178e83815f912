"""The ``bakeedit`` command: a Click group whose commands only wire library calls together.

Each command lives in its own module of this package and is registered below.
"""

from __future__ import annotations

from bakeedit.cli.apply import apply_command
from bakeedit.cli.card import card_command
from bakeedit.cli.eval import eval_command
from bakeedit.cli.export import export_command
from bakeedit.cli.inspect import inspect_command
from bakeedit.cli.locate import locate_command
from bakeedit.cli.main import main
from bakeedit.cli.push import push_command
from bakeedit.cli.search import search_command
from bakeedit.cli.sweep import sweep_command
from bakeedit.cli.verify import verify_command

main.add_command(apply_command)
main.add_command(card_command)
main.add_command(eval_command)
main.add_command(export_command)
main.add_command(inspect_command)
main.add_command(locate_command)
main.add_command(push_command)
main.add_command(search_command)
main.add_command(sweep_command)
main.add_command(verify_command)

__all__ = ["main"]
