"""`python -m raycap COMMAND ...`: the same as the `raycap` console command."""
from raycap.cli import main

main()
