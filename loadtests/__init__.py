"""Load, soak and fault runs against a live service: traffic (`locustfile`), hostile clients
(`hostile`), the system under test, one run, the scenarios, the report, and `run`."""
