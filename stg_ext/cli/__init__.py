"""The `stg-ext` command line: `from stg_ext.cli import main; main(["demo", "--out", "demo_out"])`."""
from .main import main, run

__all__ = ["main", "run"]
