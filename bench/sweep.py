"""Short distill.py runs of several settings, judged on the selection split, on a pipeline config (comparison/sweep.py).

    python -m bench.sweep CONFIG.toml --variants base lors ... [--size N] [--iterations K]   (--help for every option)
"""
from comparison.sweep import main
from utils.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
