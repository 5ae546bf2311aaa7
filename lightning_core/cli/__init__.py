"""The arclight command line: one module per command group."""
