"""`python -m stg_ext ...` is the `stg-ext` command line."""
from .cli import run

if __name__ == "__main__":
    run()
