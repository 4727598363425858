"""engine: seed chunks -> knowledge-tuning datasets, driven through a teacher LLM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("engine")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
