"""`sine serve`: the retrieval service (settings from SINE_* variables)."""
from __future__ import annotations

import argparse
from typing import Any


def add(sub: Any) -> None:
    v = sub.add_parser("serve", help="serve POST /recommend (settings from SINE_* variables)",
                       description="Start the retrieval service with uvicorn. Every setting is a "
                       "SINE_* environment variable (the settings reference lists them); these flags "
                       "override the most common ones.")
    v.add_argument("--bundle", help="bundle root or bundle folder (SINE_BUNDLE)")
    v.add_argument("--host", help="bind address (SINE_HOST, default 127.0.0.1)")
    v.add_argument("--port", type=int, help="port (SINE_PORT, default 8000)")
    v.add_argument("--redis-url", help="history store (SINE_REDIS_URL); unset: cold start only")
    v.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from service.server import serve
    from service.settings import settings_from

    serve(settings_from(bundle=a.bundle, host=a.host, port=a.port, redis_url=a.redis_url))
    return 0
