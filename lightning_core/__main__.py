"""``python -m lightning_core`` runs the ``arclight`` command line."""

from lightning_core.cli.main import main

main()
