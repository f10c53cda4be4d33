"""scripts/uv_args.py: pip's configuration as uv options (what makes uv take the CPU torch wheel here)."""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "uv_args.py")
_spec = importlib.util.spec_from_file_location("uv_args", _PATH)
uv_args = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_args)

PIP_CONFIG_LIST = """:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/ignored/because/the/environment/wins'
"""


def test_pip_config_becomes_uv_options():
    config = uv_args.parse_pip_config(PIP_CONFIG_LIST)
    assert config == {"find-links": "/opt/wheels", "constraint": "/etc/xdg/pip/constraints.txt",
                      "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple"}
    assert uv_args.uv_args(config) == [
        "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
        "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt",
        "--index-strategy", "unsafe-best-match"]


def test_no_pip_config_no_options():
    assert uv_args.uv_args(uv_args.parse_pip_config("")) == []
