"""Placeholder: filled in by issue 7 work."""

from __future__ import annotations

from collections.abc import Callable

import click


def register(cli: click.Group, client: Callable[[click.Context], object]) -> None:
    pass
