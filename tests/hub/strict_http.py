"""A small strict HTTP server for protocol doubles: a route table, JSON in and out, and a record of every request
and of every request it had to reject.

A subclass lists ``ROUTES`` (method, path regex, handler name) and ``QUERY`` (the query parameters each handler
accepts) and implements the handlers as ``name(request, authed, **path_groups)``, returning a JSON-able object or a
:class:`Raw` answer, or raising :class:`Reject`. A request no route matches, or with an unknown query parameter, is
answered 400 and recorded in ``rejected``; so is any :class:`Reject` whose message starts with ``PREFIX`` (the
double's "I do not understand this"), as opposed to the errors the real service answers (404, 409, ...). Listens on
127.0.0.1 only; a daemon thread serves, and a watchdog stops the server after ``max_lifetime`` seconds.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

PREFIX = "protocol double:"
MAX_BODY = 256 << 20


class Reject(Exception):
    """An error answer: ``status``, a message (``X-Error-Message``), the service's ``X-Error-Code`` if any."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 payload: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.payload = payload or {"error": message}


@dataclass
class Raw:
    """A non-JSON answer (file content) with its headers."""

    data: bytes
    headers: dict[str, str]


class StrictServer:
    """Base of a protocol double; ``with Double(...) as d:`` serves on ``d.url`` until the block ends."""

    ROUTES: ClassVar[list[tuple[str, str, str]]] = []
    QUERY: ClassVar[dict[str, set[str]]] = {}

    def __init__(self, max_lifetime: float = 300.0):
        self.max_lifetime = max_lifetime
        self.failures: dict[str, list[int | None]] = {}  # handler -> statuses to answer next (None: serve normally)
        self.requests: list[tuple[str, str]] = []
        self.rejected: list[str] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"double": self}))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._watchdog = threading.Timer(self.max_lifetime, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._watchdog.cancel()
        self.stop()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "the double is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, handler: str, status: int, times: int = 1, after: int = 0) -> None:
        """Answer the next ``times`` requests routed to ``handler`` (e.g. ``commit``) with ``status``, after serving
        ``after`` of them normally."""
        self.failures.setdefault(handler, []).extend([None] * after + [status] * times)

    def authenticate(self, headers) -> bool:
        """Whether the request carries valid credentials (raise :class:`Reject` for invalid ones)."""
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    double: StrictServer

    def log_message(self, *args) -> None:  # keep test output clean; requests are in double.requests
        pass

    def body(self) -> bytes:
        if "_body" not in self.__dict__:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:  # bounded: each chunk has a size line, a zero-size chunk ends the stream
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    total += size
                    if total > MAX_BODY:
                        raise Reject(413, f"{PREFIX} body too large")
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self._body = b"".join(chunks)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise Reject(413, f"{PREFIX} body too large")
                self._body = self.rfile.read(length)
        return self._body

    def json(self):
        try:
            return json.loads(self.body() or b"{}")
        except ValueError:
            raise Reject(400, f"{PREFIX} body is not JSON") from None

    def _dispatch(self) -> None:
        double = self.double
        self.__dict__.pop("_body", None)  # one handler object serves every request of a keep-alive connection
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        double.requests.append((self.command, split.path))
        try:
            found = [(name, m) for method, pattern, name in double.ROUTES
                     if method == self.command and (m := re.fullmatch(pattern, split.path))]
            if not found:
                raise Reject(400, f"{PREFIX} unsupported request {self.command} {split.path}")
            name, match = found[0]
            unknown = set(self.query) - double.QUERY.get(name, set())
            if unknown:
                raise Reject(400, f"{PREFIX} {name} does not know query parameters {sorted(unknown)}")
            injected = double.failures[name].pop(0) if double.failures.get(name) else None
            if injected is not None:
                raise Reject(injected, "Internal Error (injected by the test)")
            with double.lock:
                authed = double.authenticate(self.headers)
                result = getattr(double, name)(self, authed, **{k: v for k, v in match.groupdict().items() if v})
        except Reject as exc:
            if exc.message.startswith(PREFIX):
                double.rejected.append(f"{self.command} {self.path}: {exc.message}")
            try:
                self.body()  # drain, so the connection stays usable
            except Reject:
                self.close_connection = True
            headers = {"X-Error-Message": exc.message[:200], **exc.headers}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            return self._send(exc.status, json.dumps(exc.payload).encode(), "application/json", headers)
        if isinstance(result, Raw):
            return self._send(200, result.data, None, result.headers)
        self._send(200, json.dumps(result).encode(), "application/json", {})

    def _send(self, status: int, data: bytes, content_type: str | None, headers: dict[str, str]) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch
