import sys

from sine_cli.main import main

sys.exit(main())
