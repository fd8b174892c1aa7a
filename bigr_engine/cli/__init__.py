"""The `bigr` command line."""
from bigr_engine.cli.main import main

__all__ = ["main"]
