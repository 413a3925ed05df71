"""The console's HTTP server: one page, a JSON API and a streamed answer (standard library only).

Routes (nothing else answers; no URL maps to a file, so no path reaches the host's files):

    GET  /  /app.js  /app.css     the page, from memory (read once from the package at start)
    GET  /api/info                mode, node, limits
    GET  /api/sources             the image sources (cameras, annotated topics, examples, uploads)
    GET  /api/frame?source=ID     the latest frame of a source, downscaled, as JPEG (204: none yet)
    GET  /api/history?after=N     captions with a sequence number above N
    GET  /api/status              the status panel
    POST /api/ask                 {"prompt", "source", "max_new_tokens"} -> NDJSON lines:
                                  started, delta..., done
    POST /api/cancel              {"id"}
    POST /api/upload              the image bytes (offline mode) -> {"source"}

Safety: model output and prompts only ever travel as JSON and are put into the page with
``textContent``; the page's Content-Security-Policy allows no inline script. When bound to a
loopback address, requests whose Host header names another host are refused (DNS rebinding), and
POSTs need a JSON or binary content type (which a foreign page cannot send without a CORS
preflight, which is never granted) and a same-origin Origin header when there is one.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import queue
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

ASSETS = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MAX_JSON_BODY = 64 * 1024
MAX_PROMPT_CHARS = 8000
MAX_NEW_TOKENS = 2048  # the node's max_new_tokens range
DRAIN_LIMIT = 64 * 1024 * 1024  # an over-large upload is read and dropped up to this, then cut
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
ASK_TIMEOUT_S = 900.0


class ConsoleError(Exception):
    """A request the console refuses, with the HTTP status and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# one question and its streamed answer


class Ask:
    """A question in flight: the backend puts events, the HTTP thread reads them.

    Events are dicts: ``{"event": "delta", "text": all text so far, "tokens": n}`` and one final
    ``{"event": "done", "success", "text", "message", "finish_reason", "ttft",
    "tokens_per_second", "tokens"}``. ``cancel()`` is safe from any thread, before or after the
    backend attached its canceller.
    """

    def __init__(self, prompt: str):
        self.id = secrets.token_hex(8)
        self.prompt = prompt
        self.t0 = time.monotonic()
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._canceller: Callable[[], None] | None = None
        self.cancel_requested = False
        self.finished = False

    def delta(self, text: str, tokens: int) -> None:
        if not self.finished:
            self._events.put({"event": "delta", "text": text, "tokens": int(tokens),
                              "t": round(time.monotonic() - self.t0, 4)})

    def finish(self, success: bool, message: str, text: str = "", finish_reason: str = "",
               ttft: float = 0.0, tokens_per_second: float = 0.0, tokens: int = 0) -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = True
        self._events.put({
            "event": "done", "success": bool(success), "message": message, "text": text,
            "finish_reason": finish_reason, "ttft": float(ttft),
            "tokens_per_second": float(tokens_per_second), "tokens": int(tokens),
        })

    def set_canceller(self, fn: Callable[[], None]) -> None:
        """The backend's way to stop this answer; called at once if cancel() came first."""
        with self._lock:
            self._canceller = fn
            run = self.cancel_requested
        if run:
            fn()

    def cancel(self) -> None:
        with self._lock:
            self.cancel_requested = True
            fn = self._canceller
        if fn is not None:
            fn()

    def events(self, timeout: float = ASK_TIMEOUT_S) -> Iterator[dict]:
        """Every event up to and including ``done``; a ``done`` failure after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self._events.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    self.cancel()
                    self.finish(False, f"no answer within {timeout:.0f} s; cancelled")
                continue
            yield ev
            if ev["event"] == "done":
                return


class History:
    """The recent captions, each with a sequence number (the page asks for those after N)."""

    def __init__(self, maxlen: int = 100):
        self._items: collections.deque = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, **item) -> None:
        with self._lock:
            self._seq += 1
            self._items.append({"seq": self._seq, "received": time.time(), **item})

    def after(self, seq: int) -> list[dict]:
        with self._lock:
            return [dict(i) for i in self._items if i["seq"] > seq]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# ---------------------------------------------------------------------------------------------
# what the server needs from a backend


class Backend(Protocol):
    mode: str  # "ros" or "offline"

    def info(self) -> dict: ...

    def sources(self) -> dict:
        """{"sources": [{"id", "label", "kind"}], "default": id or None}."""

    def frame(self, source: str) -> tuple[bytes, dict] | None:
        """(JPEG bytes, {"width", "height", "label", ...}) of the latest frame, or None.
        Raises ConsoleError for an unknown source or a frame that cannot be shown."""

    def start_ask(self, prompt: str, source: str | None, max_new_tokens: int = 0) -> Ask:
        """Start answering; ``max_new_tokens`` 0 is the backend's default."""

    def history(self, after: int) -> list[dict]:
        """Captions with ``seq > after``, oldest first."""

    def status(self) -> dict: ...

    def upload(self, data: bytes, content_type: str) -> dict:
        """Offline mode: keep an uploaded image; {"source": id}. Raises ConsoleError."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# the HTTP side


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """'127.0.0.1' from '127.0.0.1:8080', '::1' from '[::1]:8080'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def load_assets() -> dict[str, tuple[bytes, str]]:
    static = resources.files("internvl_ros.console").joinpath("static")
    return {path: (static.joinpath(name).read_bytes(), ctype)
            for path, (name, ctype) in ASSETS.items()}


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, backend: Backend, max_upload_bytes: int,
                 verbose: bool = False):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.backend = backend
        self.max_upload_bytes = max_upload_bytes
        self.verbose = verbose
        self.loopback_only = is_loopback(host)
        self.assets = load_assets()
        self.asks: dict[str, Ask] = {}
        self.asks_lock = threading.Lock()
        super().__init__((host, port), ConsoleHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def cancel_all(self) -> None:
        with self.asks_lock:
            asks = list(self.asks.values())
        for ask in asks:
            ask.cancel()


class ConsoleHandler(BaseHTTPRequestHandler):
    server: ConsoleServer
    server_version = "internvl-console"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends at close
    timeout = 60  # seconds a client may stall while sending

    # ------------------------------------------------------------------ plumbing

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args):
        if self.server.verbose:
            sys.stderr.write(f"internvl-console: {self.address_string()} {format % args}\n")

    def _headers(self, status: int, ctype: str, length: int | None, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self._headers(status, ctype, len(body), extra)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _check_host(self) -> None:
        if not self.server.loopback_only:
            return
        host = self.headers.get("Host")
        if host is not None and host_name(host) not in LOOPBACK_NAMES:
            raise ConsoleError(HTTPStatus.FORBIDDEN,
                               f"the console listens on loopback; Host '{host}' is refused")

    def _check_post(self, allowed: tuple[str, ...]) -> None:
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            raise ConsoleError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin} refused")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not any(ctype == a or (a.endswith("/") and ctype.startswith(a)) for a in allowed):
            raise ConsoleError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               f"Content-Type '{ctype}' not accepted here; send "
                               f"{' or '.join(allowed)}")

    def _length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ConsoleError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            n = int(raw)
        except ValueError:
            raise ConsoleError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if n < 0:
            raise ConsoleError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        return n

    def _body(self, limit: int, what: str) -> bytes:
        n = self._length()
        if n > limit:
            self._drain(n)
            raise ConsoleError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{what} is {n / 1e6:.1f} MB; the console accepts at most "
                               f"{limit / 1e6:.1f} MB")
        data = self.rfile.read(n)
        if len(data) != n:
            raise ConsoleError(HTTPStatus.BAD_REQUEST, f"{what} ended early")
        return data

    def _drain(self, n: int) -> None:
        """Read and drop an over-large body (so the browser sees the answer, not a reset)."""
        left = min(n, DRAIN_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        self.close_connection = True

    def _json_body(self) -> dict:
        try:
            obj = json.loads(self._body(MAX_JSON_BODY, "the request"))
        except (ValueError, UnicodeDecodeError):
            raise ConsoleError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ConsoleError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return obj

    def _guard(self, fn) -> None:
        try:
            self._check_host()
            fn()
        except ConsoleError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug: say so, keep serving
            sys.stderr.write(f"internvl-console: internal error on {self.command} "
                             f"{self.path!r}: {type(e).__name__}: {e}\n")
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {e}")
            except OSError:
                pass

    # ------------------------------------------------------------------ routes

    def do_GET(self):
        self._guard(self._get)

    def do_HEAD(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        backend = self.server.backend
        if url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        elif url.path in self.server.assets:
            body, ctype = self.server.assets[url.path]
            self._send(200, body, ctype)
        elif url.path == "/api/info":
            self._json({**backend.info(), "mode": backend.mode,
                        "max_upload_bytes": self.server.max_upload_bytes,
                        "max_prompt_chars": MAX_PROMPT_CHARS,
                        "max_new_tokens": MAX_NEW_TOKENS})
        elif url.path == "/api/sources":
            self._json(backend.sources())
        elif url.path == "/api/frame":
            source = (query.get("source") or [""])[0]
            got = backend.frame(source)
            if got is None:
                self._send(204, b"", "image/jpeg")
            else:
                jpeg, meta = got
                self._send(200, jpeg, "image/jpeg",
                           {"X-Frame-Info": json.dumps(meta, ensure_ascii=True)})
        elif url.path == "/api/history":
            try:
                after = int((query.get("after") or ["0"])[0])
            except ValueError:
                raise ConsoleError(HTTPStatus.BAD_REQUEST, "after must be an integer") from None
            self._json({"items": backend.history(after)})
        elif url.path == "/api/status":
            self._json(backend.status())
        else:
            raise ConsoleError(HTTPStatus.NOT_FOUND, "not found")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/ask":
            self._check_post(("application/json",))
            self._ask(self._json_body())
        elif path == "/api/cancel":
            self._check_post(("application/json",))
            ask_id = str(self._json_body().get("id", ""))
            with self.server.asks_lock:
                ask = self.server.asks.get(ask_id)
            if ask is None:
                raise ConsoleError(HTTPStatus.NOT_FOUND, "no such question in flight")
            ask.cancel()
            self._json({"ok": True})
        elif path == "/api/upload":
            self._check_post(("application/octet-stream", "image/"))
            ctype = self.headers.get("Content-Type", "")
            data = self._body(self.server.max_upload_bytes, "the image")
            self._json(self.server.backend.upload(data, ctype))
        else:
            raise ConsoleError(HTTPStatus.NOT_FOUND, "not found")

    def _ask(self, body: dict) -> None:
        prompt = body.get("prompt", "")
        source = body.get("source")
        max_new_tokens = body.get("max_new_tokens") or 0
        if not isinstance(prompt, str) or not isinstance(source, str | None):
            raise ConsoleError(HTTPStatus.BAD_REQUEST, "prompt and source must be strings")
        if (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                or not 0 <= max_new_tokens <= MAX_NEW_TOKENS):
            raise ConsoleError(HTTPStatus.BAD_REQUEST,
                               f"max_new_tokens must be an integer from 0 to {MAX_NEW_TOKENS}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConsoleError(HTTPStatus.BAD_REQUEST,
                               f"the prompt has {len(prompt)} characters; at most "
                               f"{MAX_PROMPT_CHARS}")
        ask = self.server.backend.start_ask(prompt, source, max_new_tokens)
        with self.server.asks_lock:
            self.server.asks[ask.id] = ask
        try:
            self._headers(200, "application/x-ndjson; charset=utf-8", None)
            self._line({"event": "started", "id": ask.id, "prompt": prompt})
            for ev in ask.events():
                self._line(ev)
        except OSError:  # the page went away: stop generating for nobody
            ask.cancel()
        finally:
            with self.server.asks_lock:
                self.server.asks.pop(ask.id, None)
        self.close_connection = True

    def _line(self, obj: dict) -> None:
        self.wfile.write(json.dumps(obj).encode() + b"\n")
        self.wfile.flush()


def serve(server: ConsoleServer) -> None:
    """Serve until KeyboardInterrupt (SIGINT/SIGTERM), then stop the answers in flight."""
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.cancel_all()
        server.server_close()
