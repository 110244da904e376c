"""`python -m llmalign ...` (and `accelerate launch -m llmalign ...`) runs the command line."""

from llmalign.cli import main

main()
