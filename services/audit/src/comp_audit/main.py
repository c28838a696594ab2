"""Placeholder: filled in by issue 7 work."""


def run() -> None:
    raise SystemExit("comp-audit is not built yet")
