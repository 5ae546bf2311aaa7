"""Spans to a repaired tree to triplets, by SQL: one file per step in the top-level sql/, run with bound parameters."""
