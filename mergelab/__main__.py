"""`python -m mergelab` runs the command line."""
from .cli import run

run()
