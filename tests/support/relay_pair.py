"""Four loopback sockets around a relay under test: client <-> [proxy_client | proxy_upstream]
<-> server, all on 127.0.0.1; the relay's two sides non-blocking, as the proxy's are."""

from __future__ import annotations

import socket


class Pair:
    """The test's ends (`client`, `server`) are blocking, with `timeout` if given."""

    def __init__(self, timeout: float | None = None) -> None:
        lst = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(lst.getsockname())
        self.proxy_client, _ = lst.accept()
        self.proxy_upstream = socket.create_connection(lst.getsockname())
        self.server, _ = lst.accept()
        lst.close()
        for s in (self.proxy_client, self.proxy_upstream):
            s.setblocking(False)
        for s in (self.client, self.server):
            s.settimeout(timeout)

    def close(self) -> None:
        for s in (self.client, self.server):
            s.close()
