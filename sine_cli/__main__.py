"""`python -m sine_cli`: the `sine` command."""
import sys

from sine_cli.main import main

sys.exit(main())
