"""Helpers shared by the test files: the CLI run with its output captured, and the base of the
local stand-in HTTP servers (OpenAI-compatible) that the backend tests talk to."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from http.server import BaseHTTPRequestHandler


def run_cli(argv, *, show_warnings: bool = False) -> tuple[int, str, str]:
    """``distill-detect ARGV`` in this process -> (exit status, stdout, stderr). Warnings are silenced, or
    with ``show_warnings`` printed as the CLI prints them ('warning: ...' lines on stderr)."""
    from distill_detect.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always" if show_warnings else "ignore")
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet request handler that answers JSON; stand-in servers subclass it."""

    def log_message(self, *a):
        pass

    def _send(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
