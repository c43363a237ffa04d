"""`python -m adaptery`: the same command line as `adaptery`."""

from adaptery.cli.main import main

main()
