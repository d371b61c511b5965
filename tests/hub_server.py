"""A Hub-compatible HTTP endpoint on 127.0.0.1 for tests: only the routes huggingface_hub calls for
create_repo, upload (regular files, no LFS/xet), and file download. Requires a bearer token for writes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_test_token_local"
USER = "tester"


class HubState:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # "user/name" -> {path: content}
        self.commits: dict[str, str] = {}
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    state: HubState
    endpoint: str

    def log_message(self, *args):  # keep pytest output clean
        pass

    # --- helpers ---
    def _authorised(self) -> bool:
        return self.headers.get("authorization", "") == f"Bearer {TOKEN}"

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers=None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length", 0) or 0))

    # --- routes ---
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/api/whoami-v2":
            if not self._authorised():
                return self._error(401, "Invalid credentials in Authorization header")
            return self._json(200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if match:
            repo = match.group(1)
            if repo not in self.state.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            files = [{"rfilename": name, "size": len(data)} for name, data in self.state.repos[repo].items()]
            return self._json(
                200, {"id": repo, "modelId": repo, "sha": self.state.commits[repo], "siblings": files, "private": False}
            )
        return self._resolve()

    def do_HEAD(self):
        return self._resolve()

    def _resolve(self):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if not match:
            return self._error(404, f"no route {self.path}")
        repo, _, filename = match.groups()
        if repo not in self.state.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        data = self.state.repos[repo].get(filename)
        if data is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": self.state.commits[repo], "ETag": f'"{etag}"'}
        self._send(200, data, headers, content_type="application/octet-stream")

    def do_POST(self):
        path = self.path.split("?")[0]
        body = self._body()
        if path == "/api/validate-yaml":  # model card metadata check before a README.md upload, no login needed
            return self._json(200, {"errors": [], "warnings": []})
        if not self._authorised():
            return self._error(401, "Invalid credentials in Authorization header")
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload.get('organization') or USER}/{payload['name']}"
            if not repo.startswith(f"{USER}/"):
                return self._error(403, "You don't have the rights to create a model under this namespace")
            with self.state.lock:
                exists = repo in self.state.repos
                self.state.repos.setdefault(repo, {})
                self.state.commits.setdefault(repo, "0" * 40)
            if exists:
                return self._error(409, "You already created this model repo")
            return self._json(200, {"url": f"{self.endpoint}/{repo}", "name": repo})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if not match:
            return self._error(404, f"no route {path}")
        repo, action, _ = match.groups()
        if repo not in self.state.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        with self.state.lock:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    self.state.repos[repo][value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    self.state.repos[repo].pop(item["value"]["path"], None)
            sha = hashlib.sha1(json.dumps(sorted(self.state.repos[repo])).encode() + body).hexdigest()
            self.state.commits[repo] = sha
        return self._json(200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "success": True})


def start_hub() -> tuple[ThreadingHTTPServer, HubState, str]:
    state = HubState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, handler.endpoint


def hub_env(url, tmp_path, token=TOKEN):
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    if token:
        env["HF_TOKEN"] = token
    return env
