"""Validation of named options: every option list of the project is a tuple defined once, beside
the code it configures (cost names in `transport.costs`, priors in `maths.priors`, ...), and is
checked at the boundary with one message format that names the valid choices."""

from __future__ import annotations

from typing import Sequence


def check_choice(kind: str, name: str, known: Sequence[str]) -> None:
    """Raise ValueError naming the valid choices if `name` is not one of `known`."""
    if name not in known:
        raise ValueError(f"Unknown {kind} {name!r}. Valid choices: {', '.join(known)}.")
