"""Benchmarks: they report figures (README, *Measured*); tests assert behaviour."""
from __future__ import annotations

import sys


def run_script(main, name: str) -> None:
    """``python -m experiments.bench.<name>``: bad input is one line on stderr and exit code 2."""
    from mlo.errors import UserError

    try:
        sys.exit(main())
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
