"""Placeholder: filled in by the oracles_coarse work (must not ship empty)."""

from __future__ import annotations

__all__: list[str] = []
