"""`TcpProxy` as a process of its own, for a load test whose own process is busy (locust):

    python -m devtools.proxy --target 6379

prints the port it listens on, then forwards until killed; SIGUSR1 silences every connection
(open and new), SIGUSR2 forwards again.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from devtools.local import TcpProxy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=int, required=True, help="the port to forward to")
    a = p.parse_args()
    proxy = TcpProxy(a.target)
    # the handlers only set a flag: silence() waits for the pumps, which a handler must not
    todo: list[str] = []
    wake = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: (todo.append("silence"), wake.set()))
    signal.signal(signal.SIGUSR2, lambda *_: (todo.append("forward"), wake.set()))
    signal.signal(signal.SIGTERM, lambda *_: (todo.append("stop"), wake.set()))
    print(proxy.port, flush=True)
    while True:
        wake.wait()
        wake.clear()
        while todo:
            what = todo.pop(0)
            if what == "stop":
                proxy.close()
                sys.exit(0)
            proxy.silence(new=True) if what == "silence" else proxy.forward()
            print(what, flush=True)


if __name__ == "__main__":
    main()
