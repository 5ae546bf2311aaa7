"""Prompt optimisation: GEPA (the library) over the prompt resources, with a critic as its reflection model; prompts as versions."""
