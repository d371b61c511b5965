"""The installed version, read from one place: ``pyproject.toml``, through the installed package's metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memory-peft")
except PackageNotFoundError:  # a checkout on sys.path that was never installed (pip install -e . gives the version)
    __version__ = "0+unknown"
