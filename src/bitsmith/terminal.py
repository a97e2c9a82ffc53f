"""The command line's two consoles: results on standard output, warnings and errors on standard error."""

from rich.console import Console

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
