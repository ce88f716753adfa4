"""A Hugging Face Hub stand-in on 127.0.0.1 for download and dataprep fetch tests: just the routes
huggingface_hub uses (revision info, recursive tree listing, resolve by HEAD/GET), for one repository
type. Served by a real HTTP server through the conftest fixture `fake_hub`; never the internet."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

# repo_type -> (the API's path segment, the prefix of a resolve URL), as huggingface.co spells them
ROUTES = {"model": ("models", ""), "dataset": ("datasets", "datasets/")}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Hub:
    """What the stand-in serves, and what it saw."""

    repos: dict = field(default_factory=dict)  # repo -> {"refs": {name: commit}, "commits": {commit: {path: bytes}}}
    repo_type: Literal["model", "dataset"] = "model"
    lfs: tuple[str, ...] = (".bin", ".safetensors")  # endings stored in LFS: their listing carries a sha256
    token: str | None = None  # required as a Bearer token when set
    tampered: set[str] = field(default_factory=set)  # served with bytes that differ from the listing
    port: int = 0
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    def _route(self, body: bool):
        hub: Hub = self.server.hub
        url = urlsplit(self.path)
        hub.requests.append(self.command + " " + url.path)
        path = unquote(url.path)
        if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(401, "RepoNotFound")
        api, resolve = ROUTES[hub.repo_type]
        if match := re.fullmatch(rf"/api/{api}/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path):
            repo, kind, revision = match.groups()
            kind, revision = kind or "revision", revision or "main"
            commit, files = self._resolve(repo, revision)
            if files is None:
                return
            if kind == "revision":
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in files]}
                return self._json(info)
            assert parse_qs(url.query).get("recursive", [""])[0].lower() == "true"
            return self._json([self._entry(p, data) for p, data in files.items()])
        if match := re.fullmatch(rf"/{resolve}([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, revision, name = match.groups()
            commit, files = self._resolve(repo, revision)
            if files is None:
                return
            if name not in files:
                return self._error(404, "EntryNotFound", commit)
            data = files[name]
            etag = self._entry(name, data).get("lfs", {}).get("oid") or git_sha1(data)
            if name in hub.tampered:
                data = data[::-1]
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return
        self._error(404, "RepoNotFound")

    def _resolve(self, repo: str, revision: str):
        hub: Hub = self.server.hub
        if repo not in hub.repos:
            self._error(404, "RepoNotFound")
            return None, None
        refs, commits = hub.repos[repo]["refs"], hub.repos[repo]["commits"]
        commit = refs.get(revision, revision)
        if commit not in commits:
            self._error(404, "RevisionNotFound")
            return None, None
        return commit, commits[commit]

    def _entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if path.endswith(self.server.hub.lfs):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _json(self, value):
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, error_code: str, commit: str | None = None):
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up is part of the tests
            super().handle_error(request, client_address)


def serve(handler, state) -> ThreadingHTTPServer:
    """`handler` on a free port of 127.0.0.1 (written to state.port), in a daemon thread."""
    server = QuietServer(("127.0.0.1", 0), handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
