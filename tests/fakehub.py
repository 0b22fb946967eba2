"""A loopback fake of the Hugging Face Hub HTTP API, just big enough for the real huggingface_hub client.

    with FakeHub(token="hf_test") as hub:          # binds 127.0.0.1 on a free port
        HfApi(endpoint=hub.url, token="hf_test").create_repo("org/results", repo_type="dataset")
        hub.files("dataset", "org/results")        # {path: bytes} on main

Endpoints (huggingface_hub 2.4, see ../shared/FIELD_NOTES.md): repo create (409 when it exists),
preupload (everything "regular"), ndjson commit (also `create_pr=1`: the files go to refs/pr/N, main is
untouched), validate-yaml, revision info, tree listing, and HEAD/GET resolve. Git LFS / Xet uploads are
refused: results files are small. Writes need `Authorization: Bearer <token>` when a token is set.
The server runs in a daemon thread and stops when the `with` block ends.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self) -> None:
        self.refs: dict[str, str] = {}                   # ref name -> commit sha
        self.trees: dict[str, dict[str, bytes]] = {}     # commit sha -> {path: content}
        self.commits: list[dict] = []                    # [{sha, ref, summary, paths}]
        self.commit("main", {}, "initial commit")

    def commit(self, ref: str, files: dict[str, bytes], summary: str) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}:{ref}:{summary}".encode()
                           + b"".join(sorted(k.encode() + v for k, v in files.items()))).hexdigest()
        self.trees[sha], self.refs[ref] = files, sha
        self.commits.append({"sha": sha, "ref": ref, "summary": summary, "paths": sorted(files)})
        return sha

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.trees else None)


class FakeHub:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []         # (method, path) of every request
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_type: str, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return dict(repo.trees[repo.refs[ref]])

    def commits(self, repo_type: str, repo_id: str) -> list[dict]:
        return list(self.repos[(repo_type, repo_id)].commits)


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
            self._send(status, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}, head)

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return False

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            hub.requests.append((method, url.path))
            with hub.lock:
                if parts[0] == "api" and len(parts) > 1:
                    return self._api(method, parts[1:], query)
                repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
                if repo_type != "model":
                    parts = parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                    return self._resolve(repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), method)
                self._error(404, "NotFound", f"no route for {method} {url.path}")

        def _api(self, method: str, parts: list[str], query: dict) -> None:
            if method == "POST" and parts == ["repos", "create"]:
                return self._create_repo(json.loads(self._body()))
            if method == "POST" and parts == ["validate-yaml"]:
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            repo_type = parts[0].rstrip("s")
            if repo_type not in PREFIX or len(parts) < 3:
                return self._error(404, "NotFound", "unknown API route")
            repo_id, action, rest = "/".join(parts[1:3]), parts[3] if len(parts) > 3 else "", parts[4:]
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            rev = rest[0] if rest else "main"
            if method == "GET" and action in ("", "revision"):
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                siblings = [{"rfilename": p} for p in sorted(repo.trees[sha])]
                return self._json(200, {"id": repo_id, "sha": sha, "siblings": siblings, "private": False,
                                        "lastModified": "2025-01-01T00:00:00.000Z"})
            if method == "GET" and action == "tree":
                return self._tree(repo, rev, "/".join(rest[1:]), query.get("recursive") in ("1", "true", "True"))
            if method == "POST" and action == "preupload":
                if not self._authorized():
                    return
                files = json.loads(self._body())["files"]
                main = repo.trees[repo.refs["main"]]
                return self._json(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_sha(main[f["path"]]) if f["path"] in main else None} for f in files]})
            if method == "POST" and action == "commit":
                if not self._authorized():
                    return
                return self._commit(repo_type, repo_id, repo, rev, query.get("create_pr") == "1")
            self._error(404, "NotFound", f"unknown API route {action}")

        def _create_repo(self, payload: dict) -> None:
            if not self._authorized():
                return
            repo_type = payload.get("type") or "model"
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            url = f"{hub.url}/{PREFIX[repo_type]}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                return self._json(409, {"error": "You already created this repo", "url": url})
            hub.repos[(repo_type, repo_id)] = Repo()
            self._json(200, {"url": url, "name": repo_id})

        def _commit(self, repo_type: str, repo_id: str, repo: Repo, rev: str, create_pr: bool) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            base = repo.resolve(rev)
            if base is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(repo.trees[base])
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key != "header":
                    return self._error(400, "BadRequest", f"the fake Hub does not support {key!r} operations")
            prefix = f"{hub.url}/{PREFIX[repo_type]}{repo_id}"
            body = {}
            if create_pr:
                number = sum(ref.startswith("refs/pr/") for ref in repo.refs) + 1
                ref = f"refs/pr/{number}"
                body["pullRequestUrl"] = f"{prefix}/discussions/{number}"
            else:
                ref = rev if rev in repo.refs else "main"
            sha = repo.commit(ref, files, header.get("summary", ""))
            self._json(200, {"commitUrl": f"{prefix}/commit/{sha}", "commitOid": sha, "success": True, **body})

        def _tree(self, repo: Repo, rev: str, path: str, recursive: bool) -> None:
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            entries: dict[str, dict] = {}
            for file_path, data in sorted(repo.trees[sha].items()):
                if not file_path.startswith(prefix):
                    continue
                rel = file_path[len(prefix):].split("/")
                depth = len(rel) if recursive else 1
                for i in range(1, min(depth, len(rel) - 1) + 1):  # folders on the way
                    folder = prefix + "/".join(rel[:i])
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                if recursive or len(rel) == 1:
                    entries[file_path] = {"type": "file", "oid": git_blob_sha(data), "size": len(data),
                                          "path": file_path}
            if prefix and not entries:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            self._json(200, list(entries.values()))

        def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str, method: str) -> None:
            head = method == "HEAD"
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository Not Found", head)
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            data = repo.trees[sha].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist", head)
            self._send(200, data, {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": sha,
                                   "Content-Type": "application/octet-stream"}, head)

    return Handler
