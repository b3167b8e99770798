"""The chart's `helm test`: `python -m service.smoke http://<service>:<port>` asks `/readyz` and
one `POST /recommend` of a deployed release, and exits 0 only when both answer 200 and the
answer lists items; with `SINE_READ_TOKEN` in its environment it sends it as the bearer token.
Standard library only: it runs in the service's own image."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def check(base: str, user_id: str = "helm-test", n: int = 5, timeout_s: float = 10.0,
          token: str | None = None) -> str:
    """A line saying what answered; raises RuntimeError saying what did not."""
    base = base.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=timeout_s) as r:
            ready = json.load(r)
        req = urllib.request.Request(f"{base}/recommend", method="POST",
                                     data=json.dumps({"user_id": user_id, "n": n}).encode(),
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{e.url}: {e.code} {e.read()[:500]!r}") from None
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{base}: {e}") from None
    if not body.get("items"):
        raise RuntimeError(f"{base}/recommend answered no items: {body}")
    return (f"ok: {base} ready ({ready.get('version', '?')}), /recommend gave "
            f"{len(body['items'])} items ({body.get('fallback') or 'personalized'})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.smoke", description=__doc__)
    ap.add_argument("url", help="the release's base URL, e.g. http://sine-sine-retrieval:80")
    ap.add_argument("--user-id", default="helm-test")
    ap.add_argument("--timeout-s", type=float, default=10.0)
    a = ap.parse_args(argv)
    try:
        print(check(a.url, a.user_id, timeout_s=a.timeout_s,
                    token=os.environ.get("SINE_READ_TOKEN")))
    except RuntimeError as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
