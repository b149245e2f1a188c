"""Weight downloads against loopback servers: resume, verification, and the CLIP path through
huggingface_hub (a fake hub answering `resolve` requests)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine import weights

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer:
    """Serves `files` by path with Range support; `break_after[path]` drops the next transfer of
    that path after so many bytes. Every request is logged, as it is answered, as (method, path,
    Range, bytes sent)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}  # extra response headers by path
        self.break_after: dict[str, int] = {}
        self.log: list[tuple[str, str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                data = server.files.get(path)
                rng = self.headers.get("Range")
                if data is None:
                    server.log.append((self.command, path, rng, 0))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
                if start >= len(data) and rng:
                    server.log.append((self.command, path, rng, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                part = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in server.headers.get(path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                cut = server.break_after.pop(path, None) if body else None
                sent = 0 if not body else len(part) if cut is None else cut
                # Logged before the body goes out: the client may finish reading and the test
                # look at the log before this thread runs again.
                server.log.append((self.command, path, rng, sent))
                if body:
                    self.wfile.write(part[:sent])
                    if cut is not None:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # the peer sees a short body

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def gets(self, path: str) -> list[tuple[str, str, str | None, int]]:
        return [e for e in self.log if e[0] == "GET" and e[1] == path]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Loopback servers only: a proxy from the environment must not be asked for them."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(folder))
    return folder


def payload(n: int = 1_000_000, seed: int = 1) -> bytes:
    return hashlib.shake_256(str(seed).encode()).digest(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_completes_and_verifies(server, models):
    data = payload()
    server.files["/a.pt"] = data
    dest = models / "a.pt"
    assert weights.download(server.url + "/a.pt", dest, sha(data), progress=False) == sha(data)
    assert dest.read_bytes() == data
    assert not (models / "a.pt.partial").exists()


def test_broken_transfer_resumes_with_a_range_request(server, models):
    data = payload()
    server.files["/a.pt"] = data
    server.break_after["/a.pt"] = 300_000
    dest = models / "a.pt"
    weights.download(server.url + "/a.pt", dest, sha(data), retry_wait=0, progress=False)
    assert dest.read_bytes() == data
    (first, second) = server.gets("/a.pt")
    assert first[2] is None and first[3] == 300_000
    assert second[2] == "bytes=300000-" and second[3] == len(data) - 300_000


def test_a_partial_file_left_by_an_earlier_run_is_resumed(server, models):
    data = payload()
    server.files["/a.pt"] = data
    server.break_after["/a.pt"] = 400_000
    dest = models / "a.pt"
    with pytest.raises(weights.DownloadError, match="run the same command again to resume"):
        weights.download(server.url + "/a.pt", dest, sha(data), attempts=1, progress=False)
    assert not dest.exists() and (models / "a.pt.partial").stat().st_size == 400_000
    weights.download(server.url + "/a.pt", dest, sha(data), attempts=1, progress=False)
    assert dest.read_bytes() == data
    assert [g[2] for g in server.gets("/a.pt")] == [None, "bytes=400000-"]


def test_a_checksum_mismatch_fails_clearly_and_leaves_no_file(server, models):
    server.files["/a.pt"] = payload()
    dest = models / "a.pt"
    with pytest.raises(weights.ChecksumMismatch) as err:
        weights.download(server.url + "/a.pt", dest, "0" * 64, progress=False)
    assert "a.pt: sha256 mismatch" in str(err.value) and "0" * 64 in str(err.value)
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == []


def test_a_corrupted_file_present_is_fetched_again_and_a_valid_one_skipped(
    server, models, monkeypatch, capsys
):
    data = payload()
    server.files["/test.pt"] = data
    monkeypatch.setenv(weights.URL_ENV, server.url)
    monkeypatch.setitem(weights.FILES, "test", weights.WeightFile("test.pt", "", sha(data), "1 MB"))
    models.mkdir()
    (models / "test.pt").write_bytes(data[:-1] + b"!")
    assert weights.check("test").state == "corrupt"
    weights.fetch("test", progress=False)
    assert (models / "test.pt").read_bytes() == data
    assert "damaged" in capsys.readouterr().out
    weights.fetch("test", progress=False)
    assert "present (sha256 verified), skipped" in capsys.readouterr().out
    assert len(server.gets("/test.pt")) == 1


def test_the_hash_is_cached_by_size_and_mtime(models, monkeypatch):
    models.mkdir()
    f = models / "w.pt"
    f.write_bytes(b"abc")
    calls = []
    real = weights._hash_file
    monkeypatch.setattr(weights, "_hash_file", lambda p: calls.append(p) or real(p))
    assert weights.sha256_of(f) == weights.sha256_of(f) == sha(b"abc")
    assert len(calls) == 1
    f.write_bytes(b"abcd")  # another size: hashed again
    assert weights.sha256_of(f) == sha(b"abcd") and len(calls) == 2


def test_the_unpublished_512_hash_is_recorded_on_first_download(server, models, monkeypatch):
    first, other = payload(5000, 1), payload(5000, 2)
    name = weights.ADM512.name
    server.files[f"/{name}"] = first
    monkeypatch.setenv(weights.URL_ENV, server.url + "/")
    weights.fetch("adm512", progress=False)
    assert (models / f"{name}.sha256").read_text().split()[0] == sha(first)
    assert weights.check("adm512").state == "ok"
    (models / name).unlink()
    server.files[f"/{name}"] = other  # the host now serves something else: refused
    with pytest.raises(weights.ChecksumMismatch):
        weights.fetch("adm512", progress=False)
    assert not (models / name).exists()


def run_weights(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.weights", *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_an_adm256_that_does_not_match_the_published_hash(server, tmp_path):
    server.files[f"/{weights.ADM256.name}"] = payload(10_000)
    env = {"BLENDED_DIFFUSION_MODELS": str(tmp_path), weights.URL_ENV: server.url}
    r = run_weights("fetch", "adm256", "--no-progress", env=env)
    assert r.returncode == 1
    assert "sha256 mismatch" in r.stderr and weights.ADM256.sha256 in r.stderr
    assert not (tmp_path / weights.ADM256.name).exists()


def fake_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)


def serve_hub_file(server: FileServer, data: bytes, etag: str) -> None:
    for revision in ("main", COMMIT):  # huggingface_hub asks for `main`, open_clip too
        path = f"/{weights.CLIP_REPO}/resolve/{revision}/{weights.CLIP_FILE}"
        server.files[path] = data
        server.headers[path] = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{etag}"',
            "X-Linked-Etag": f'"{etag}"',
            "X-Linked-Size": str(len(data)),
        }


def test_clip_comes_through_huggingface_hub_where_open_clip_finds_it(server, tmp_path):
    data = fake_safetensors()
    serve_hub_file(server, data, sha(data))
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf"),
        "BLENDED_DIFFUSION_MODELS": str(tmp_path / "models"),
    }
    r = run_weights("fetch", "clip", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    snapshot = tmp_path / "hub/models--timm--vit_base_patch16_clip_224.openai/snapshots" / COMMIT
    assert (snapshot / weights.CLIP_FILE).read_bytes() == data
    assert "sha256 verified" in r.stdout
    assert any(e[0] == "HEAD" for e in server.log)

    # open_clip, offline, resolves its `openai` tag to that very file
    code = (
        "from open_clip.pretrained import download_pretrained, get_pretrained_cfg;"
        "print(download_pretrained(get_pretrained_cfg('ViT-B-16-quickgelu', 'openai')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip().splitlines()[-1]) == snapshot / weights.CLIP_FILE

    served = len(server.log)
    r = run_weights("fetch", "clip", env=env)  # present and valid: no request at all
    assert r.returncode == 0 and "skipped" in r.stdout and len(server.log) == served


def test_clip_that_does_not_match_its_etag_is_refused_and_removed(server, tmp_path):
    data = fake_safetensors()
    serve_hub_file(server, data, sha(b"something else"))
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf"),
        "BLENDED_DIFFUSION_MODELS": str(tmp_path / "models"),
    }
    r = run_weights("fetch", "clip", "--no-progress", env=env)
    assert r.returncode == 1
    assert "sha256 mismatch" in r.stderr
    assert not list((tmp_path / "hub").rglob(weights.CLIP_FILE))
