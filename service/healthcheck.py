"""The images' HEALTHCHECK: `python -m service.healthcheck` asks this process's own `/livez` on
the port the settings say (`SINE_PORT`), not a fixed one. Exit 0 when it answers 200."""
from __future__ import annotations

import sys
import urllib.request

from .settings import Settings


def main(timeout_s: float = 2.0) -> int:
    port = Settings().port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=timeout_s) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:
        print(f"unhealthy: 127.0.0.1:{port}/livez: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
