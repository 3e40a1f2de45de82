"""A small fault-injecting HTTP proxy for a loopback S3 server: outages, resets, 503 SlowDown, delays.

It sits between pyarrow's S3 client and the server (``AWS_ENDPOINT_URL`` points at the proxy) and frames
HTTP/1.1 requests and responses itself, so it can answer one request with a 503 and pass the next:

    proxy = FaultProxy(upstream_port).start()
    proxy.down()                 # the port refuses connections; open ones are reset
    proxy.up()                   # it listens again
    proxy.throttle = 0.3         # that share of requests (at random) is answered 503 SlowDown
    proxy.delay_s = 0.5          # every request waits that long
    proxy.hang = True            # requests are read and never answered
    proxy.requests, proxy.injected  # counts
"""

from __future__ import annotations

import random
import socket
import threading
import time

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


def _read_head(sock, buffer: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer.extend(chunk)
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def _read_exact(sock, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed mid-body")
        buffer.extend(chunk)
    body = bytes(buffer[:n])
    del buffer[:n]
    return body


def _read_line(sock, buffer: bytearray, where: str) -> bytes:
    """One CRLF-terminated line from ``buffer``, reading ``sock`` as needed."""
    while b"\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"peer closed {where}")
        buffer.extend(chunk)
    end = buffer.index(b"\r\n") + 2
    line = bytes(buffer[:end])
    del buffer[:end]
    return line


def _read_chunked(sock, buffer: bytearray) -> bytes:
    out = bytearray()
    while True:
        line = _read_line(sock, buffer, "mid-chunk")
        size = int(line.split(b";")[0].strip(), 16)
        out += line
        if size == 0:  # trailers, then an empty line
            while True:
                trailer = _read_line(sock, buffer, "in trailers")
                out += trailer
                if trailer == b"\r\n":
                    return bytes(out)
        out += _read_exact(sock, buffer, size + 2)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


def _body(sock, buffer, headers) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(sock, buffer)
    return _read_exact(sock, buffer, int(headers.get("content-length", 0)))


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = 0
        self.throttle = 0.0
        self.delay_s = 0.0
        self.hang = False
        self.requests = self.injected = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._closed = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self.up()
        return self

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections (nothing listens on the port) and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in list(self._open):
                self._reset(sock)
            self._open.clear()

    def close(self) -> None:
        self._closed = True
        self.down()

    @staticmethod
    def _reset(sock) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        except OSError:
            pass

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._listener is not listener:
                self._reset(client)
                return
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        upstream = None
        cbuf, ubuf = bytearray(), bytearray()
        try:
            while True:
                head = _read_head(client, cbuf)
                if head is None:
                    return
                headers = _headers(head)
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(line for line in head.split(b"\r\n")
                                        if not line.lower().startswith(b"expect:"))
                body = _body(client, cbuf, headers)
                with self._lock:
                    self.requests += 1
                    inject = self._random.random() < self.throttle
                    if inject:
                        self.injected += 1
                if self.hang:
                    while self.hang and not self._closed:
                        time.sleep(0.1)
                    return
                if self.delay_s:
                    time.sleep(self.delay_s)
                if inject:
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(SLOW_DOWN) + SLOW_DOWN)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                upstream.sendall(head + body)
                response = _read_head(upstream, ubuf)
                if response is None:
                    return
                rheaders = _headers(response)
                status = int(response.split(b" ", 2)[1])
                no_body = head.startswith(b"HEAD ") or status in (204, 304) or 100 <= status < 200
                client.sendall(response + (b"" if no_body else _body(upstream, ubuf, rheaders)))
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(client)
            for sock in (client, upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
