"""Development and demo tooling: the embedded Redis and server processes, the stack helper the
benchmarks and load tests share, and `sine demo`. Not part of the serving image."""
