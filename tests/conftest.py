"""Shared fixtures: the asyncio backend, fresh structlog defaults, repo paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import settings

# No per-example deadline: CI shares two cores with a simulator and PostgreSQL, and a
# slow example is not a failure. Examples stay bounded by max_examples.
settings.register_profile("sluice", deadline=None)
settings.load_profile("sluice")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
