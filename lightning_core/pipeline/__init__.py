"""Spans to a repaired tree to triplets, by SQL: one .sql file per step (package data), run with bound parameters."""
