"""Training from the command line: `python train.py ...` or, once installed, `primal-dual ...`."""

from cli.command import PrimalDualCLI, cli_main, main

__all__ = ["PrimalDualCLI", "cli_main", "main"]
