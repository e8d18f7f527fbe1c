"""How the fair ladder changed worth-N, read off a pipeline run's tuning cells (comparison/ladder_rule.py).

    python -m bench.ladder_rule outputs/flickr8k_table
"""
from comparison.ladder_rule import main
from utils.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
