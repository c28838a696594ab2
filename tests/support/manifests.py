"""Parsing helpers shared by the manifest tests."""

from __future__ import annotations

import pytest

from comp_common.manifest import Deployment, ManifestError, parse_deployments


def only(text: str) -> Deployment:
    """The one deployment ``text`` holds."""
    deployments = parse_deployments(text)
    assert len(deployments) == 1
    return deployments[0]


def errors_of(text: str) -> list[dict[str, str]]:
    """The problems ``parse_deployments`` reports for ``text``, which it must reject."""
    with pytest.raises(ManifestError) as caught:
        parse_deployments(text)
    return caught.value.errors
