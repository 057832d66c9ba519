"""Placeholder: filled in by the expectation work (must not ship empty)."""

from __future__ import annotations

__all__: list[str] = []
