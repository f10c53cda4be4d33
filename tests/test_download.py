"""dit_jax.download against a local HTTP server on 127.0.0.1 (a thread per test; no internet)."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from dit_jax.utils import download as dl

pytestmark = pytest.mark.timeout(60)

PAYLOAD = np.random.default_rng(0).bytes(300_000)  # not a multiple of the 1 MiB read size
NAME = "DiT-XL-2-256x256.pt"


class Server:
    """Serves PAYLOAD at /<NAME>. `drop_first`: the first GET sends all headers but only half the body,
    then closes the connection. `honour_range`: answer `Range: bytes=N-` with 206, else always 200."""

    def __init__(self, drop_first=False, honour_range=True):
        self.drop_first, self.honour_range = drop_first, honour_range
        self.requests = []  # (path, Range header)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                if self.path != f"/{NAME}":
                    self.send_error(404)
                    return
                start = 0
                if rng and outer.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drop_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_full_download_with_sha256(tmp_path):
    dest = str(tmp_path / "sub" / NAME)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    with Server() as srv:
        assert dl.download_file(f"{srv.url}/{NAME}", dest, progress=True, expected_sha256=sha) == dest
    assert _read(dest) == PAYLOAD
    assert not os.path.exists(dest + ".part")
    assert srv.requests == [(f"/{NAME}", None)]


def test_interrupted_download_resumes_with_range(tmp_path):
    dest = str(tmp_path / NAME)
    with Server(drop_first=True) as srv:
        dl.download_file(f"{srv.url}/{NAME}", dest, progress=False, timeout=5)
    assert _read(dest) == PAYLOAD
    assert len(srv.requests) == 2
    half = (len(PAYLOAD)) // 2
    assert srv.requests[1] == (f"/{NAME}", f"bytes={half}-")  # resumed exactly where the drop left off
    assert not os.path.exists(dest + ".part")


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    dest = str(tmp_path / NAME)
    with Server(drop_first=True, honour_range=False) as srv:
        dl.download_file(f"{srv.url}/{NAME}", dest, progress=False, timeout=5)
    assert _read(dest) == PAYLOAD  # the 200 answer rewrote the partial file from byte 0, no duplication
    assert srv.requests[1][1] is not None  # it did ask for a range
    assert not os.path.exists(dest + ".part")


def test_sha256_mismatch_leaves_no_file(tmp_path):
    dest = str(tmp_path / NAME)
    with Server() as srv, pytest.raises(dl.DownloadError, match="sha256"):
        dl.download_file(f"{srv.url}/{NAME}", dest, progress=False, expected_sha256="0" * 64)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


def test_dit_checkpoint_path_downloads_once_into_cache(tmp_path, monkeypatch):
    with Server() as srv:
        monkeypatch.setenv("DIT_JAX_BASE_URL", srv.url)
        monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path / "cache"))
        path = dl.dit_checkpoint_path(256, progress=False)
        assert path == str(tmp_path / "cache" / NAME) and _read(path) == PAYLOAD
        assert dl.dit_checkpoint_path(256) == path  # cached: no second request
    assert len(srv.requests) == 1
    with pytest.raises(ValueError, match="384"):
        dl.dit_checkpoint_path(384)


def _unused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_dit_checkpoint_offline_error_says_what_to_do(tmp_path):
    base = f"http://127.0.0.1:{_unused_port()}/DiT/models"
    with pytest.raises(dl.DownloadError) as err:
        dl.dit_checkpoint_path(512, cache_dir=str(tmp_path), base_url=base, progress=False)
    msg = str(err.value)
    for needle in ("DiT-XL-2-512x512.pt", f"{base}/DiT-XL-2-512x512.pt", str(tmp_path / "DiT-XL-2-512x512.pt"),
                   "--ckpt PATH"):
        assert needle in msg, (needle, msg)
    assert not os.path.exists(tmp_path / "DiT-XL-2-512x512.pt")


def test_http_404_is_not_retried(tmp_path):
    with Server() as srv, pytest.raises(dl.DownloadError, match="404"):
        dl.download_file(f"{srv.url}/missing.pt", str(tmp_path / "x.pt"), progress=False)
    assert len(srv.requests) == 1


# The hub reads HF_HUB_OFFLINE/HF_HOME at import time, so these run in a fresh interpreter.
HUB_SCRIPT = """
import json, sys
from dit_jax.utils import download as dl
try:
    print(json.dumps({"path": dl.vae_weights_path(sys.argv[1], cache_dir=sys.argv[2] or None)}))
except dl.DownloadError as e:
    print(json.dumps({"error": str(e)}))
"""


def _run_hub(tmp_path, kind, cache_dir=""):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, kind, cache_dir], env=env, capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vae_offline_error_and_cached_offline_path(tmp_path):
    res = _run_hub(tmp_path, "ema")
    msg = res["error"]
    for needle in ("stabilityai/sd-vae-ft-ema", "config.json", "diffusion_pytorch_model.safetensors", "--vae PATH"):
        assert needle in msg, (needle, msg)
    # A populated hub cache (the layout huggingface_hub writes) is used offline without the network.
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--stabilityai--sd-vae-ft-mse"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in dl.VAE_FILES:
        (snap / f).write_text("{}")
    assert _run_hub(tmp_path, "mse", str(cache)) == {"path": str(snap)}
