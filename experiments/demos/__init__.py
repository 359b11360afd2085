"""Rows of the demo table: one module per technique, discovered by experiments/demo.py.

Each module defines ``ORDER`` (int, table position), ``TECHNIQUE`` (str) and
``run(seed: int) -> list[tuple[str, str, str]]`` returning rows (technique, what was measured, value).
A row must come from a real computation on small embedded data and take seconds on a CPU.
"""
