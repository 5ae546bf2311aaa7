"""The SQL pipeline's steps and the analyst views (views.sql), shipped in the wheel as package data (pyproject.toml maps
lightning_core.sql to this folder) and read through importlib.resources."""
