"""The paper's method against LoRS and RepBlend on a pipeline config (comparison/methods.py).

    python -m bench.bench_methods CONFIG.toml [--data IMAGE_ROOT] ...   (--help for every option)
"""
from comparison.methods import main
from utils.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
