"""Real remote model stores on loopback for the disk-tier tests.

* :class:`S3Server`: S3Proxy (Maven Central ``org.gaul:s3proxy``, installed once per machine by
  ``tests/s3/install.sh`` into ``~/.cache/kubeinfer/s3proxy-VERSION``), a real S3-compatible
  server that stores objects on the filesystem and checks AWS signature v4 credentials.
* :class:`HubServer`: an HTTP endpoint in the Hugging Face hub's layout (``/api/models/ORG/NAME/revision/REV``,
  ``/api/models/ORG/NAME/tree/REV``, ``/ORG/NAME/resolve/REV/PATH`` with the hub's ``X-Repo-Commit``,
  ``ETag``/``X-Linked-Etag`` and ``X-Linked-Size`` headers), serving model directories as repositories,
  reached by ``huggingface_hub`` through ``HF_ENDPOINT``. Optionally requires a bearer token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
S3_ACCESS_KEY = "kubeinfer-test"
S3_SECRET_KEY = "kubeinfer-test-secret-key"
S3_REGION = "us-east-1"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_s3proxy() -> Path:
    """Run ``tests/s3/install.sh`` (a no-op once installed); returns the install directory."""
    out = subprocess.run([str(REPO_ROOT / "tests/s3/install.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


class S3Server:
    """S3Proxy with a filesystem store under ``data_dir``.

    Args:
        data_dir: where objects are stored.
        host: address to listen on: loopback for the tests; the e2e tier passes the real node's
            bridge gateway address so pods on the node reach it.
        access_key, secret_key: the one identity the server accepts (default :data:`S3_ACCESS_KEY`,
            :data:`S3_SECRET_KEY`).
    """

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", access_key: str = S3_ACCESS_KEY,
                 secret_key: str = S3_SECRET_KEY) -> None:
        self.data_dir = data_dir
        self.host = host
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> S3Server:
        """Install if needed, start, and wait until it answers."""
        home = install_s3proxy()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir.parent / f"s3proxy-{self.port}.conf"
        conf.write_text(
            f"s3proxy.endpoint={self.endpoint}\ns3proxy.authorization=aws-v2-or-v4\n"
            f"s3proxy.identity={self.access_key}\ns3proxy.credential={self.secret_key}\n"
            f"jclouds.provider=filesystem\njclouds.filesystem.basedir={self.data_dir}\n"
        )
        self.log = open(self.data_dir.parent / f"s3proxy-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-cp", f"{home}/lib/*", "org.gaul.s3proxy.Main", "--properties", str(conf)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "LOG_LEVEL": "warn"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"s3proxy exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"s3proxy did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        """Terminate the server process (only the one this object started)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A MinIO SDK client for this server (its own identity unless others are given)."""
        from minio import Minio

        return Minio(f"{self.host}:{self.port}", access_key=access_key or self.access_key,
                     secret_key=secret_key or self.secret_key, secure=False, region=S3_REGION)

    def env(self, access_key: str = S3_ACCESS_KEY, secret_key: str = S3_SECRET_KEY) -> dict[str, str]:
        """The environment a serving pod gets from its credentials Secret for this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": S3_REGION,
                "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}

    def upload_dir(self, bucket: str, prefix: str, directory: Path) -> int:
        """Upload every file of ``directory`` under ``prefix/``; creates the bucket; returns the bytes uploaded."""
        c = self.client()
        if not c.bucket_exists(bucket):
            c.make_bucket(bucket)
        total = 0
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            c.fput_object(bucket, f"{prefix}/{rel}", str(path))
            total += path.stat().st_size
        return total


# ---------------------------------------------------------------------------------------------- hub


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, directory: Path, lfs_suffixes: tuple[str, ...]) -> None:
        self.repo_id = repo_id
        self.files: dict[str, bytes] = {
            p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()
        }
        self.lfs = {name for name in self.files if name.endswith(lfs_suffixes)}
        self.sha = hashlib.sha1(repo_id.encode() + b"".join(hashlib.sha1(d).digest() for d in self.files.values())).hexdigest()
        self.corrupt: set[str] = set()
        self.truncate: set[str] = set()

    def entry(self, name: str) -> dict:
        data = self.files[name]
        out = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_sha1(data)}
        if name in self.lfs:
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    def served_bytes(self, name: str) -> bytes:
        data = self.files[name]
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if name in self.truncate:
            data = data[: len(data) // 2]
        return data


class HubServer:
    """A Hugging Face hub endpoint on 127.0.0.1 serving repositories added with :meth:`add_repo`.

    Attributes:
        endpoint: the value for ``HF_ENDPOINT``.
        token: when set, every request needs ``Authorization: Bearer TOKEN`` (else HTTP 401).
        requests: request paths served, in order.
    """

    def __init__(self, token: str | None = None) -> None:
        self.repos: dict[str, _Repo] = {}
        self.token = token
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        """Serve in a background thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(self, repo_id: str, directory: Path, lfs_suffixes: tuple[str, ...] = (".safetensors",)) -> _Repo:
        """Serve ``directory`` as repository ``repo_id`` (its commit sha is derived from the content)."""
        repo = self.repos[repo_id] = _Repo(repo_id, directory, lfs_suffixes)
        return repo

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status: int, message: str, head: bool, code: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head)

    def _find(self, parts: list[str]) -> tuple[_Repo | None, list[str]]:
        if len(parts) >= 2 and "/".join(parts[:2]) in self.repos:
            return self.repos["/".join(parts[:2])], parts[2:]
        return None, parts

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        self.requests.append(url.path)
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "Invalid credentials in Authorization header", head)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo, rest = self._find(parts[2:] if api else parts)
        if repo is None:
            return self._error(h, 404, "Repository not found", head, code="RepoNotFound")
        if api and (not rest or rest[:1] == ["revision"]):
            if rest and unquote(rest[1]) not in ("main", repo.sha):
                return self._error(h, 404, "Invalid rev id", head, code="RevisionNotFound")
            body = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha, "private": False,
                    "siblings": [{"rfilename": n} for n in repo.files]}
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if api and rest[:1] == ["tree"]:
            if rest[1] not in ("main", repo.sha):
                return self._error(h, 404, "Invalid rev id", head, code="RevisionNotFound")
            body = [repo.entry(n) for n in repo.files]
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
            rev, name = rest[1], "/".join(rest[2:])
            if rev not in ("main", repo.sha):
                return self._error(h, 404, "Invalid rev id", head, code="RevisionNotFound")
            if name not in repo.files:
                return self._error(h, 404, "Entry not found", head, code="EntryNotFound")
            entry = repo.entry(name)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            data = repo.served_bytes(name)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream",
                       "Accept-Ranges": "bytes"}
            if "lfs" in entry:
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(repo.files[name]))
            return self._send(h, 200, data, headers, head)
        return self._error(h, 404, "Not found", head)


def copy_model(src: Path, dest: Path) -> Path:
    """Copy a model directory (so tests may alter it); returns ``dest``."""
    shutil.copytree(src, dest)
    return dest
