"""A local stand-in for the Hugging Face Hub's HTTP API: just the calls a folder upload makes.

It answers repo creation, pre-upload (every file as a regular git blob, no LFS/xet) and commits,
and records what it received, so the real `huggingface_hub` client can be exercised offline.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self, token: str = "hf_standin"):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path))
                if not self._authorised():
                    return
                if self.path == "/api/repos/create":
                    spec = json.loads(body)
                    repo = f"{spec.get('organization') or 'user'}/{spec['name']}"
                    hub.repos[repo] = spec
                    hub.files.setdefault(repo, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if self.path == "/api/validate-yaml":  # the model card's metadata check
                    return self._reply(200, {})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", self.path)
                if match and match.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                for f in files
                            ],
                            "commitOid": "0" * 40,
                        },
                    )
                if match and match.group(2) == "commit":
                    repo = match.group(1)
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            hub.files[repo][value["path"]] = base64.b64decode(value["content"])
                    return self._reply(
                        200,
                        {
                            "commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}",
                            "commitOid": "a" * 40,
                            "pullRequestUrl": None,
                        },
                    )
                self._reply(404, {"error": f"stand-in does not know POST {self.path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"stand-in does not know GET {self.path}"})

        return Handler
