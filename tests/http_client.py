"""One HTTP client for the tests' requests to workers' APIs.

`httpx.get()` and the like build a client per call, and with it a TLS context loaded from the CA bundle:
about 60 ms on the 2-core test machine, so a test polling profiles one by one spent seconds per pass. This
client is built once; keep-alive is off, so every request still opens a connection of its own (a worker
stopped and started again on the same port is never asked over a connection to its predecessor)."""

from __future__ import annotations

import httpx

HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
