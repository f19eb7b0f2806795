"""What every `python -m agent.<tool>` shares: a refusal is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage block replaced by one `<tool>: error: ...` line (exit status 2)."""

    def __init__(self, tool: str, **kwargs):
        super().__init__(prog=f"python -m {tool}", **kwargs)
        self.tool = tool

    def error(self, message: str):
        self.exit(2, f"{self.tool}: error: {message}\n")

    def refuse(self, exc: BaseException) -> int:
        """Print `exc` (a library error) as the tool's one error line; returns the exit status 2."""
        text = str(exc).strip()
        self._print_message(f"{self.tool}: error: {text.splitlines()[0] if text else type(exc).__name__}\n",
                            sys.stderr)
        return 2
