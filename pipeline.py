"""The whole comparison in one command: experts -> real-data rows -> distilled sets -> one table, worth-N, a plot.

    python pipeline.py configs/demo.toml                 # what `make demo` runs
    python pipeline.py configs/flickr8k.toml --data ../shared/data/flickr8k

The stages and the TOML file's sections are described in comparison/pipeline.py and the README ("Demo").
"""
from utils.cli import run_cli  # first: a Ctrl-C while the libraries load is one line
from comparison.pipeline import main

def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
