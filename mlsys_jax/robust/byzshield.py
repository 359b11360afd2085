"""Placeholder until its issue lands; the owning issue replaces this file (or package)."""

__all__: list[str] = []
