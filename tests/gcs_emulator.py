"""A Google Cloud Storage emulator on 127.0.0.1 for tests of bucket paths (gs://), real clients included.

`gcp-storage-emulator` (PyPI) serves the JSON/XML API in memory, behind tests/faulty_gcs_proxy.py: the proxy
adds the object generation the emulator leaves out of downloads (tensorstore needs it to update an OCDBT
manifest; without it orbax saves fail now and then with "Malformed StorageGeneration") and lets a test fail
chosen requests (`GcsEmulator.proxy.fail`). The variables `emulator_env` returns point every client dit_jax
uses at the proxy: gcsfs through etils.epath (STORAGE_EMULATOR_HOST, EPATH_USE_TF=false),
tensorstore, which writes orbax's arrays (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING), and
gcsfs's experimental bucket-type probe switched off (it would ask Google's control API and wait for a
timeout). Command lines a test starts inherit them.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Dict

from faulty_gcs_proxy import FaultyProxy

BUCKET = "bkt"
# The emulator's http.server listens with a backlog of 5: a client's burst of concurrent ranged GETs (gcsfs
# cat_ranges, tensorstore) overflows it and the dropped connections retry after ~1 s. A bucket has no such
# limit, so the emulator starts with a deeper backlog.
LAUNCH = ("import sys, http.server; http.server.HTTPServer.request_queue_size = 256; "
          "from gcp_storage_emulator.__main__ import main; sys.exit(main(sys.argv[1:]))")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(url: str) -> Dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class GcsEmulator:
    """Starts the emulator with one empty bucket (BUCKET); `stop()` ends it and everything in it."""

    def __init__(self, startup_timeout: float = 30.0):
        self.port = _free_port()
        self.backend_url = f"http://127.0.0.1:{self.port}"  # the emulator itself
        self.proxy = None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--in-memory", "--default-bucket", BUCKET],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + startup_timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS emulator did not start on port {self.port}")
                time.sleep(0.1)
        self.proxy = FaultyProxy(self.backend_url)
        self.url = self.proxy.url  # what clients talk to

    @property
    def env(self) -> Dict[str, str]:
        return emulator_env(self.url)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
