"""Frozen / last stage / whole encoder at equal CPU time on a pipeline config (comparison/regimes.py).

    python -m bench.bench_regimes CONFIG.toml [--data IMAGE_ROOT] ...   (--help for every option)
"""
from comparison.regimes import main
from utils.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
