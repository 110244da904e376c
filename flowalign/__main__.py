"""`python -m flowalign ...` (and `accelerate launch -m flowalign ...`): the `flowalign` command line."""

from flowalign.cli import main

main()
