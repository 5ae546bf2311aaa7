"""``python -m lightning_core`` runs the ``arclight`` command line."""

from lightning_core.cli import main

main()
