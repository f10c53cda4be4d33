"""Downloads: the released DiT-XL/2 checkpoints (plain HTTPS) and the SD VAE (huggingface_hub).

    path = dit_checkpoint_path(256)          # ~/.cache/dit_jax/DiT-XL-2-256x256.pt, downloaded once
    folder = vae_weights_path("mse")         # config.json + diffusion_pytorch_model.safetensors

Environment: DIT_JAX_CACHE (cache folder), DIT_JAX_BASE_URL (mirror of the release folder, used by tests),
HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME (read by huggingface_hub).
A download goes to `<dest>.part`, resumes with an HTTP Range request after a dropped connection, is
checked against Content-Length (and a sha256 when given), and only then renamed to `<dest>`.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Optional

from huggingface_hub import hf_hub_download
from tqdm.auto import tqdm

from dit_jax.utils.errors import DitJaxError

DIT_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models"
DIT_IMAGE_SIZES = (256, 512)
VAE_REPOS = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
CHUNK = 1 << 20  # bytes per read


class DownloadError(DitJaxError, RuntimeError):
    """A download that failed; the message says what to fetch by hand and which flag takes a local path."""


def default_cache_dir() -> str:
    return os.environ.get("DIT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dit_jax")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _total_from_content_range(value: Optional[str]) -> Optional[int]:
    """'bytes 100-199/200' -> 200 (None when the total is '*' or the header is absent)."""
    m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _range_start(value: Optional[str]) -> Optional[int]:
    m = re.match(r"bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def _fetch_once(url: str, part: str, progress: bool, timeout: float) -> None:
    """One HTTP request that appends to (206) or rewrites (200) `part`; raises on a short or failed read."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "dit_jax", **({"Range": f"bytes={have}-"} if have else {})}
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our partial file is not a prefix the server accepts: start over
            os.remove(part)
            raise ConnectionError(f"server refused to resume at byte {have} (HTTP 416); restarting") from e
        raise
    with resp:
        if resp.status == 206:
            if _range_start(resp.headers.get("Content-Range")) != have:  # not the range we asked for
                if os.path.exists(part):
                    os.remove(part)
                raise ConnectionError(f"server answered Range bytes={have}- with "
                                      f"Content-Range {resp.headers.get('Content-Range')!r}; restarting")
            mode, start = "ab", have
            total = _total_from_content_range(resp.headers.get("Content-Range"))
        else:  # 200: the server ignored Range (or this is a fresh download): write from byte 0
            mode, start = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        bar = None
        if progress:
            bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=os.path.basename(part[: -len(".part")]))
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def download_file(url: str, dest: str, progress: bool = True, expected_sha256: Optional[str] = None,
                  retries: int = 3, timeout: float = 60.0) -> str:
    """Stream `url` to `dest` (via `dest + '.part'`, resumed with Range after a drop), check, rename; -> dest.

    Retries up to `retries` times on connection errors, resuming where the partial file ends (or starting
    over when the server ignores Range). A sha256 mismatch deletes the partial file and raises.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)) or ".", exist_ok=True)
    part = dest + ".part"
    last_error: Optional[BaseException] = None
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, progress, timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500:  # 404 and friends do not get better by retrying
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            last_error = e
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError, socket.timeout, OSError) as e:
            last_error = e
        if attempt < retries:
            time.sleep(min(0.2 * 2 ** attempt, 5.0))
    else:
        kept = (f"; the partial file {part} ({os.path.getsize(part)} bytes) is kept and a later call resumes it"
                if os.path.exists(part) and os.path.getsize(part) else "")
        raise DownloadError(f"{url}: failed after {retries + 1} attempts ({last_error}){kept}") from None
    if expected_sha256 is not None:
        got = _sha256(part)
        if got != expected_sha256.lower():
            os.remove(part)
            raise DownloadError(f"{url}: sha256 {got} does not match the expected {expected_sha256}; "
                                "the corrupt download was deleted")
    os.replace(part, dest)  # atomic on one filesystem: `dest` is either absent or complete
    return dest


def dit_checkpoint_name(image_size: int) -> str:
    if image_size not in DIT_IMAGE_SIZES:
        raise ValueError(f"released DiT-XL/2 checkpoints exist for image sizes {DIT_IMAGE_SIZES}, not {image_size}")
    return f"DiT-XL-2-{image_size}x{image_size}.pt"


def dit_checkpoint_path(image_size: int, cache_dir: Optional[str] = None, base_url: Optional[str] = None,
                        progress: bool = True) -> str:
    """Path of the released DiT-XL/2 checkpoint for 256 or 512 px, downloading it into the cache once."""
    name = dit_checkpoint_name(image_size)
    cache_dir = cache_dir or default_cache_dir()
    dest = os.path.join(cache_dir, name)
    if os.path.isfile(dest):
        return dest
    base_url = (base_url or os.environ.get("DIT_JAX_BASE_URL") or DIT_BASE_URL).rstrip("/")
    url = f"{base_url}/{name}"
    try:
        return download_file(url, dest, progress=progress)
    except (DownloadError, OSError) as e:
        raise DownloadError(
            f"Could not download the DiT-XL/2 checkpoint: {e}. "
            f"Download {name} from {url} (e.g. `curl -L -o {dest} {url}`) and put it at {dest} "
            f"(or set DIT_JAX_CACHE to the folder that holds it), or pass `--ckpt PATH` with a local "
            f"checkpoint file.") from None


def vae_weights_path(kind: str, cache_dir: Optional[str] = None) -> str:
    """Folder holding config.json + diffusion_pytorch_model.safetensors of sd-vae-ft-{mse,ema}, via the Hub."""
    if kind not in VAE_REPOS:
        raise ValueError(f"VAE kind must be one of {sorted(VAE_REPOS)} (or pass a local path), got {kind!r}")
    repo = VAE_REPOS[kind]
    try:
        paths = [hf_hub_download(repo, f, cache_dir=cache_dir) for f in VAE_FILES]
    except Exception as e:  # the hub raises many types (offline, HTTP, connection, missing cache entry)
        raise DownloadError(
            f"Could not get the VAE from the Hugging Face Hub ({type(e).__name__}: {' '.join(str(e).split())}). "
            f"Download {' and '.join(VAE_FILES)} from https://huggingface.co/{repo} into one folder "
            f"and pass `--vae PATH` with that folder (or with the .safetensors file).") from None
    folder = os.path.dirname(paths[0])
    assert all(os.path.dirname(p) == folder for p in paths), paths
    return folder
