"""`sine`, the project's command line: argument parsing only; each command calls one function of
the package that owns the work (see `sine_cli.main`). Nothing imports this package."""
