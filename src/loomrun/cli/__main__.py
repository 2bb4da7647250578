"""`python -m loomrun.cli`: the console script."""

from loomrun.cli import command_line

command_line()
