"""FID Inception weights: the .pth download (a server on 127.0.0.1), the converter, and the torch-free cache.

- The download goes to the cache under pytorch-fid's file name; a file whose sha256 does not start with the
  prefix in its name is deleted; offline, the error names the file, the URL, the cache path and --inception.
- The converter folds each BatchNorm into its convolution: checked against torch's own conv + BN on one layer
  (relative error <= 1e-6); wrong or missing keys are errors naming the key.
- inception_params(): .pth -> converted once into the cache, read back without torch afterwards.
"""
import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from dit_jax.utils.download import DownloadError
from dit_jax.evaluation import weights as W
from conftest import rel_err

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(300)


def _state_dict():
    from convert.inception_weights import torch_keys

    g = np.random.default_rng(0)
    sd = {k: torch.tensor(g.normal(0, 0.1, s) + (1.0 if k.endswith(("bn.weight", "running_var")) else 0.0),
                          dtype=torch.float32) for k, s in torch_keys().items()}
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(7)  # what newer torch.save writes; ignored
    return sd


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("pth") / W.PTH_NAME
    torch.save(_state_dict(), path)
    return str(path)


class Server:
    def __init__(self, payload: bytes):
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{W.PTH_NAME}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def test_download_convert_and_cache(pth, tmp_path, monkeypatch):
    from convert import inception_weights as IW

    payload = open(pth, "rb").read()
    monkeypatch.setattr(W, "PTH_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    cache = str(tmp_path / "cache")
    with Server(payload) as srv:
        monkeypatch.setenv("DIT_JAX_INCEPTION_URL", srv.url)
        params = IW.inception_params(cache_dir=cache, progress=False)
        assert srv.hits == 1
        assert sorted(os.listdir(cache)) == sorted([W.PTH_NAME, W.CONVERTED_NAME])
        # the second call reads the converted file: no download, no torch needed
        monkeypatch.setattr(IW, "convert_file", lambda *a: pytest.fail("converted twice"))
        again = IW.inception_params(cache_dir=cache, progress=False)
        assert srv.hits == 1
    for a, b in zip(W.flatten(params).values(), W.flatten(again).values()):
        np.testing.assert_array_equal(a, b)
    assert W.flatten(W.load_params(os.path.join(cache, W.CONVERTED_NAME))).keys() == W.flatten(params).keys()


def test_download_with_wrong_hash_is_deleted(tmp_path, monkeypatch):
    with Server(b"x" * 1000) as srv:
        with pytest.raises(DownloadError, match="sha256 does not start with 6726825d") as e:
            W.inception_pth_path(str(tmp_path), url=srv.url, progress=False)
    assert os.listdir(tmp_path) == []
    assert W.PTH_NAME in str(e.value) and "--inception PATH" in str(e.value)


def test_offline_message_names_the_file(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/{W.PTH_NAME}"
    with pytest.raises(DownloadError) as e:
        W.inception_pth_path(str(tmp_path), url=url, progress=False)
    msg = str(e.value)
    assert f"Download {W.PTH_NAME} from {url}" in msg and os.path.join(str(tmp_path), W.PTH_NAME) in msg
    assert "--inception PATH" in msg and "DIT_JAX_CACHE" in msg


def test_local_pth_converted_once(pth, tmp_path, monkeypatch):
    from convert import inception_weights as IW

    cache = str(tmp_path / "c")
    params = IW.inception_params(pth, cache_dir=cache)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("inception-") and files[0].endswith("-flax.npz")
    monkeypatch.setattr(IW, "convert_file", lambda *a: pytest.fail("converted twice"))
    IW.inception_params(pth, cache_dir=cache)
    assert IW.inception_params(os.path.join(cache, files[0])).keys() == params.keys()  # a converted file as PATH
    with pytest.raises(W.InceptionWeightsError, match="no such file"):
        IW.inception_params(str(tmp_path / "nope.pth"))


def test_batchnorm_folding_matches_torch():
    """Tolerance: relative error <= 1e-6 between torch's conv + BatchNorm(eps=1e-3) and the folded conv."""
    from convert.inception_weights import inception_torch_to_flax

    sd = _state_dict()
    params = inception_torch_to_flax(sd)
    conv = torch.nn.Conv2d(32, 64, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(64, eps=1e-3).eval()
    conv.weight.data = sd["Conv2d_2b_3x3.conv.weight"]
    for f in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, f).data = sd[f"Conv2d_2b_3x3.bn.{f}"]
    x = np.random.default_rng(1).normal(size=(1, 9, 9, 32)).astype(np.float32)
    with torch.no_grad():
        want = bn(conv(torch.from_numpy(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
    import jax

    p = params["Conv2d_2b_3x3"]
    got = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), [(1, 1), (1, 1)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST) + p["bias"]
    assert rel_err(np.asarray(got), want) <= 1e-6


def test_converter_errors():
    from convert.inception_weights import inception_torch_to_flax
    from convert.mapping import ConversionError

    sd = _state_dict()
    del sd["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(ConversionError, match=r"1 keys missing \(first \['Mixed_6d.branch1x1.bn.running_var'\]\)"):
        inception_torch_to_flax(sd)
    sd = _state_dict()
    sd["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ConversionError, match=r"fc.weight: shape \(1000, 2048\), expected \(1008, 2048\)"):
        inception_torch_to_flax(sd)
    sd = _state_dict()
    sd["AuxLogits.fc.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="1 unexpected .first \\['AuxLogits.fc.weight'\\]"):
        inception_torch_to_flax(sd)


def test_converted_file_checks(tmp_path):
    bad = tmp_path / "x.npz"
    with open(bad, "wb") as f:
        np.savez(f, a=np.zeros(3))
    with pytest.raises(W.InceptionWeightsError, match="not a converted FID Inception file"):
        W.load_params(str(bad))
