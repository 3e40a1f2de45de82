"""``guided-saliency view OUTPUT [--audit REPORT_DIR]``: a local web page over a job's output and its audit.

The server answers a few JSON and PNG routes and serves one page (``page.html``); it reads only the output and the
input it was given: no route takes a path, pictures are asked for by a row's part-file number and id, and a part
number is checked against the output's own list. Every error the page can meet is one line of JSON
(``{"error": ...}``), never a stack trace.

Routes:

=====================  =================================================================================
``/``                  the page
``/api/run``           the run: rows, classes, numeric columns, the label column, whether an audit is open
``/api/slice?...``     a page of a slice (:class:`~worker.explore.slices.Slice`'s query keys)
``/api/row?part&id``   one row whole: every column, the map's colour scale, the audit's notes on its class
``/api/picture``       ``?part&id&kind=image|map|overlay&size=small|large``: one PNG
``/api/audit``         the audit's classes, findings and shortcuts, each with its slice
=====================  =================================================================================
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from worker.explore.findings import Audit
from worker.explore.pictures import SIZES, Pictures
from worker.explore.slices import Output, QueryError, Slice

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("id", "part", "label", "predicted_class", "predicted_prob", "target_class", "target_score",
                   "error")


def _plain(value):
    """A cell as JSON: NaN and infinities as None, numpy scalars as numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Explorer:
    """What the server serves: an output, its pictures and, when given, its audit."""

    def __init__(self, output: str, audit: str | None = None):
        self.audit = Audit(audit) if audit else None
        self.output = Output(output, members=self.audit and self.audit.members)
        self.pictures = Pictures(self.output.config)
        self._recent: dict[tuple[int, str], dict] = {}  # the rows of the last pages, for their pictures
        self._lock = threading.Lock()

    def _remember(self, rows: list[dict]) -> None:
        with self._lock:
            for row in rows:
                self._recent[(row["part"], row["id"])] = row
            while len(self._recent) > 4 * 200:
                self._recent.pop(next(iter(self._recent)))

    def _row(self, part: int, row_id: str) -> dict:
        with self._lock:
            row = self._recent.get((part, row_id))
        if row is None:
            row = self.output.row(part, row_id)
            self._remember([row])
        return row

    def _summary(self, row: dict) -> dict:
        out = {k: _plain(row.get(k)) for k in SUMMARY_COLUMNS if k in row or k == "part"}
        out["true_name"] = self.output.class_name(row.get(self.output.label)) if self.output.label else None
        first = lambda v: v[0] if isinstance(v, list) and v else v  # noqa: E731 - top:K runs' first class
        out["predicted_name"] = self.output.class_name(row.get("predicted_class"))
        out["target_name"] = self.output.class_name(first(row.get("target_class")))
        return out

    def run(self) -> dict:
        o = self.output
        return {"output": o.uri, "rows": o.rows(), "parts": len(o.parts), "label": o.label,
                "classes": o.class_names or [str(i) for i in
                                             range((o.metadata.get("model") or {}).get("num_classes") or 0)],
                "numeric": o.numeric, "method": o.metadata.get("method"),
                "model": o.config.model, "input": o.config.input, "audit": self.audit is not None,
                "clusters": [[c["value"], f"{c['class_name']} ({c['kind']}): cluster {c['cluster']}, "
                                          f"{c['count']} maps"] for c in (self.audit.clusters() if self.audit else [])],
                "derived_ids": not o.config.id_column}

    def slice(self, query: dict) -> dict:
        page = self.output.page(Slice.from_query(query))
        self._remember(page.rows)
        started = time.perf_counter()
        self.pictures.prefetch(page.rows)
        return {"total": page.total, "offset": page.offset, "rows": [self._summary(r) for r in page.rows],
                "seconds": round(page.seconds, 3), "pictures_seconds": round(time.perf_counter() - started, 3)}

    def row(self, query: dict) -> dict:
        part, row_id = self._address(query)
        row = self._row(part, row_id)
        columns = {k: _plain(v) for k, v in row.items() if k not in ("map", "part")}
        plane = self.pictures.plane(row) if row.get("map") is not None else None
        scale = None if plane is None else {"low": 0.0, "high": _plain(float(plane.max())),
                                            "unit": "|gradient| at the model's input"}
        notes, probes = [], []
        if self.audit is not None:
            name = self._summary(row)["true_name"]
            notes = [f for f in self.audit.view()["findings"] if f.get("class_name") == name and name is not None]
            probes = [{**p, "class_name": self.output.class_name(p["class"]),
                       "versions": [{**v, "predicted_name": self.output.class_name(v["predicted"])}
                                    for v in p["versions"]]} for p in self.audit.probes(row_id)]
        return {**self._summary(row), "columns": columns, "scale": scale, "audit": notes, "probes": probes}

    def picture(self, query: dict) -> bytes:
        part, row_id = self._address(query)
        kind, size = query.get("kind", "image"), query.get("size", "small")
        if size not in SIZES:
            raise QueryError(f"size={size} is not one of {sorted(SIZES)}")
        try:
            return self.pictures.picture(self._row(part, row_id), kind, size)
        except LookupError as exc:
            raise QueryError(str(exc).strip("'\"")) from None

    @staticmethod
    def _address(query: dict) -> tuple[int, str]:
        part, row_id = query.get("part", ""), query.get("id")
        if not part.isdigit() or not row_id:
            raise QueryError("a row is named by part=<number>&id=<its id>, as the slice gave them")
        return int(part), row_id


def _handler(explorer: Explorer):
    page = resources.files("worker.explore").joinpath("page.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "guided-saliency"

        def log_message(self, fmt, *args):  # the console stays for the URL and errors
            log.debug(fmt, *args)

        def _send(self, status: int, body: bytes, kind: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value, allow_nan=False).encode(), "application/json")

        def do_GET(self):  # noqa: N802 - the http.server name
            url = urllib.parse.urlsplit(self.path)
            query = {k: v if k == "range" else v[-1]
                     for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
            try:
                if url.path in ("/", "/index.html"):
                    self._send(200, page, "text/html; charset=utf-8")
                elif url.path == "/api/run":
                    self._json(200, explorer.run())
                elif url.path == "/api/slice":
                    self._json(200, explorer.slice(query))
                elif url.path == "/api/row":
                    self._json(200, explorer.row(query))
                elif url.path == "/api/picture":
                    self._send(200, explorer.picture(query), "image/png", cache=True)
                elif url.path == "/api/audit":
                    if explorer.audit is None:
                        raise QueryError("no audit is open: start the explorer with --audit REPORT_DIR")
                    self._json(200, explorer.audit.view())
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})
            except QueryError as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - the page gets one line, the console the trace
                log.exception("answering %s", self.path)
                first = (str(exc).strip().splitlines() or [""])[0]
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {first}"})

    return Handler


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for ``explorer`` on ``host:port`` (port 0: any free port); call ``serve_forever`` on it."""
    server = ThreadingHTTPServer((host, port), _handler(explorer))
    server.daemon_threads = True
    return server
