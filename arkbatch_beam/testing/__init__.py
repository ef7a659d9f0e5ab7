"""Test helpers for arkbatch_beam: a fake Ark batch-inference server and a fake clock.

``FakeArkServer`` and ``Fault`` are imported lazily so that
``python -m arkbatch_beam.testing.fake_server`` does not import the module
twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arkbatch_beam.testing.fake_clock import FakeClock

if TYPE_CHECKING:
    from arkbatch_beam.testing.fake_server import FakeArkServer, Fault

__all__ = ["FakeArkServer", "FakeClock", "Fault"]


def __getattr__(name: str) -> Any:
    """Import ``FakeArkServer`` / ``Fault`` from ``fake_server`` on first use."""
    if name in ("FakeArkServer", "Fault"):
        from arkbatch_beam.testing import fake_server

        return getattr(fake_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
