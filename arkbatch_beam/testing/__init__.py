"""Test helpers for arkbatch_beam: a fake Ark batch-inference server.

``FakeArkServer`` and ``Fault`` are imported lazily so that
``python -m arkbatch_beam.testing.fake_server`` does not import the module
twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arkbatch_beam.testing.fake_server import FakeArkServer, Fault

__all__ = ["FakeArkServer", "Fault"]


def __getattr__(name: str) -> Any:
    """Import ``FakeArkServer`` / ``Fault`` from ``fake_server`` on first use."""
    if name in __all__:
        from arkbatch_beam.testing import fake_server

        return getattr(fake_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
