"""oi-ray: TAO-compatible optical inspection (SiameseOI) on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oi-ray")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
