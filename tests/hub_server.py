"""A small Hugging Face Hub stand-in, served for real on loopback, for the real huggingface_hub client.

It implements the endpoints that ``snapshot_download``, ``create_repo`` and ``upload_folder``
use: repo info, tree listing, file resolve (HEAD/GET), repo creation, pre-upload and commit
(every file is "regular": inlined base64, no LFS/Xet). Repos live in memory as commits of
{path: bytes}. Dataset repos (``add_folder(..., repo_type="dataset")``) are read through the same
endpoints under ``/api/datasets/`` and ``/datasets/``. It records every request, so tests can check
what was downloaded; a file's GET honours ``Range: bytes=a-b`` (206), the bytes each file's GETs sent are
counted (``served``), and ``drop`` cuts that many of the next file responses off halfway, closing the connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _git_hash(data: bytes) -> str:
    """git's blob id of ``data`` (what the Hub gives as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    private: bool = False
    gated: bool = False
    prs: int = 0

    def commit(self, files: dict[str, bytes], parent: str | None, message: str) -> str:
        sha = _sha(json.dumps([parent, message, sorted((p, _sha(d)) for p, d in files.items())]).encode())
        self.commits[sha] = files
        return sha

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hangs up mid-file is no news
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubStandIn:
    """Start with ``with HubStandIn() as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.datasets: dict[str, Repo] = {}  # dataset repos: their own namespace, as on the Hub
        self.requests: list[tuple[str, str]] = []
        self.token_seen: list[str | None] = []
        self.validated: list[str] = []  # README.md contents upload_folder asked to validate
        self.tokens: set[str] | None = None  # the tokens the Hub knows (None: any token is a user's)
        self.read_only_orgs: set[str] = set()  # namespaces the user cannot create repos in
        self.served: dict[str, int] = {}  # a file's path in its repo -> the bytes its GETs sent
        self.ranges: list[tuple[str, str | None]] = []  # (path, the Range header) of every file GET
        self.drop = 0  # the next file responses cut off halfway (connection closed), then served whole
        self.uploaded: list[tuple[str, int]] = []  # (path, bytes) of every file a commit carried
        self.serve_ranges = True  # False: a Range header is ignored (200, the whole file), as some servers do
        self.lock = threading.Lock()
        self._server = _Quiet(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- test helpers ---------------------------------------------------------------
    def add_folder(
        self, repo_id: str, folder: Path, *, branch: str = "main", gated: bool = False, repo_type: str = "model"
    ) -> str:
        """Publish every file of ``folder`` as a new commit on ``branch`` of a model (or dataset) repo; returns
        the commit sha."""
        repos = self.datasets if repo_type == "dataset" else self.repos
        repo = repos.setdefault(repo_id, Repo(gated=gated))
        parent = repo.refs.get(branch)
        files = dict(repo.commits.get(parent, {}))
        files.update({str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()})
        sha = repo.commit(files, parent, f"add {folder.name}")
        repo.refs[branch] = sha
        return sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def downloaded(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    # --- HTTP ---------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            repo_type = "model"  # the request's: set by _route

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(
                self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False
            ) -> None:
                data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
                self.send_response(status)
                ctype = "application/json" if isinstance(body, (dict, list)) else "application/octet-stream"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

            def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
                repo = (hub.datasets if self.repo_type == "dataset" else hub.repos).get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                    return None
                if repo.gated:
                    self._error(403, "GatedRepo", f"Access to {self.repo_type} {repo_id} is restricted", head)
                    return None
                return repo

            def _rev(self, repo: Repo, rev: str, head: bool = False) -> str | None:
                sha = repo.resolve(unquote(rev))
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return sha

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                hub.requests.append((method, url.path))
                hub.token_seen.append(self.headers.get("Authorization"))
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                head = method == "HEAD"
                self.repo_type = "model"  # one handler serves a kept-alive connection's every request
                if parts[:2] == ["api", "datasets"]:  # a dataset repo: the models' endpoints, on its namespace
                    self.repo_type, parts = "dataset", ["api", "models", *parts[2:]]
                elif parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
                    self.repo_type, parts = "dataset", parts[1:]
                if parts[:2] == ["api", "models"] and len(parts) == 4 and method == "GET":
                    parts += ["revision", "main"]  # model_info without a revision
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo = self._repo(f"{parts[2]}/{parts[3]}")
                    sha = repo and self._rev(repo, parts[5])
                    if not sha:
                        return
                    files = repo.commits[sha]
                    if parts[4] == "revision":
                        return self._send(
                            200,
                            {
                                "id": f"{parts[2]}/{parts[3]}",
                                "sha": sha,
                                "private": repo.private,
                                "siblings": [
                                    {"rfilename": p, **({"size": len(d)} if "blobs=true" in url.query else {})}
                                    for p, d in sorted(files.items())
                                ],
                            },
                        )
                    return self._send(
                        200,
                        [
                            {"type": "file", "oid": _git_hash(d), "size": len(d), "path": p}
                            for p, d in sorted(files.items())
                        ],
                    )
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = self._repo(f"{parts[0]}/{parts[1]}", head)
                    sha = repo and self._rev(repo, parts[3], head)
                    if not sha:
                        return
                    path = "/".join(parts[4:])
                    data = repo.commits[sha].get(path)
                    if data is None:
                        return self._error(404, "EntryNotFound", f"{path} not found", head)
                    return self._file(path, data, {"X-Repo-Commit": sha, "ETag": f'"{_sha(data)}"'}, head)
                if parts == ["api", "repos", "create"] and method == "POST":
                    doc = json.loads(body)
                    repo_id = f"{doc['organization']}/{doc['name']}" if doc.get("organization") else doc["name"]
                    if doc.get("organization") in hub.read_only_orgs:
                        return self._error(
                            403,
                            "Forbidden",
                            f'You don\'t have the rights to create a model under the namespace "{doc["organization"]}"',
                        )
                    if repo_id in hub.repos:
                        return self._send(
                            409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                        )
                    private = bool(doc.get("private")) or doc.get("visibility") == "private"
                    repo = hub.repos[repo_id] = Repo(private=private)
                    repo.refs["main"] = repo.commit({}, None, "initial commit")
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    repo = self._repo(f"{parts[2]}/{parts[3]}")
                    if repo:
                        files = json.loads(body)["files"]
                        held = repo.commits.get(repo.resolve("/".join(parts[5:])) or "", {})
                        return self._send(  # each file's oid where the revision holds it, as the Hub answers
                            200,
                            {
                                "files": [
                                    {
                                        "path": f["path"],
                                        "uploadMode": "regular",
                                        "shouldIgnore": False,
                                        "oid": _git_hash(held[f["path"]]) if f["path"] in held else None,
                                    }
                                    for f in files
                                ]
                            },
                        )
                    return
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit" and method == "POST":
                    return self._commit(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]), body)
                if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "discussions":
                    repo = self._repo(f"{parts[2]}/{parts[3]}")
                    if repo is None:
                        return
                    if method == "POST":  # a draft pull request, as create_pr=True opens one
                        repo.prs += 1
                        repo.refs[f"refs/pr/{repo.prs}"] = repo.refs["main"]
                        return self._send(200, {"num": repo.prs})
                    num = int(parts[5])
                    return self._send(
                        200,
                        {
                            "title": "PR",
                            "num": num,
                            "author": {"name": "tester"},
                            "status": "draft",
                            "createdAt": "2026-01-01T00:00:00.000Z",
                            "repo": {"name": f"{parts[2]}/{parts[3]}", "type": "model"},
                            "isPullRequest": True,
                            "events": [],
                            "changes": {"base": "refs/heads/main"},
                            "filesWithConflicts": [],
                        },
                    )
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch" and method == "POST":
                    repo = self._repo(f"{parts[2]}/{parts[3]}")
                    if repo is None:
                        return
                    branch = "/".join(parts[5:])
                    if branch in repo.refs:
                        return self._send(409, {"error": "Reference already exists"})
                    start = json.loads(body or b"{}").get("startingPoint") or "main"
                    repo.refs[branch] = repo.resolve(start)
                    return self._send(200, {})
                if parts == ["api", "validate-yaml"] and method == "POST":
                    hub.validated.append(json.loads(body)["content"])
                    return self._send(200, {"warnings": []})
                if parts[:2] == ["api", "whoami-v2"]:
                    token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    if not token or (hub.tokens is not None and token not in hub.tokens):
                        return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                    return self._send(200, {"type": "user", "name": "tester", "orgs": []})
                self._error(404, "NotImplemented", f"stand-in has no {method} {url.path}")

            def _file(self, path: str, data: bytes, headers: dict, head: bool) -> None:
                """A file's bytes, or the range asked of them; counted; cut off halfway while ``drop`` lasts."""
                wanted = self.headers.get("Range")
                status, part = 200, data
                if wanted and not head and hub.serve_ranges:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                    if start >= len(data):
                        return self._error(416, "RangeNotSatisfiable", f"{wanted} of {len(data)} bytes")
                    status, part = 206, data[start : end + 1]
                    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
                with hub.lock:
                    hub.ranges.append((path, wanted))
                    cut = hub.drop > 0 and not head and len(part) > 1
                    hub.drop -= cut
                if not cut:
                    with hub.lock:
                        hub.served[path] = hub.served.get(path, 0) + (0 if head else len(part))
                    return self._send(status, part, headers, head)
                self.send_response(status)  # the whole length announced, half of it sent, the connection closed
                self.send_header("Content-Length", str(len(part)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                with hub.lock:
                    hub.served[path] = hub.served.get(path, 0) + len(part) // 2
                self.close_connection = True

            def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                parent_ref = unquote(rev)
                parent = repo.resolve(parent_ref)
                if parent is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = dict(repo.commits[parent])
                for line in lines:
                    if line["key"] == "file":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        hub.uploaded.append((line["value"]["path"], len(files[line["value"]["path"]])))
                    elif line["key"] == "deletedFile":
                        files.pop(line["value"]["path"], None)
                sha = repo.commit(files, parent, header.get("summary", ""))
                repo.refs[parent_ref] = sha
                self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

            def do_GET(self) -> None:
                self._route("GET")

            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_POST(self) -> None:
                self._route("POST")

        return Handler


@contextmanager
def serving(monkeypatch, cache: Path) -> Iterator[HubStandIn]:
    """A stand-in running, and this process's huggingface_hub pointed at it: its endpoint, a token, online, the
    Hub cache at ``cache`` (pytest's ``monkeypatch`` puts everything back)."""
    from huggingface_hub import constants

    with HubStandIn() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        yield server
