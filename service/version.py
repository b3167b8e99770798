"""The one version string: the package's, as installed (pyproject.toml), used by the API, the
CLI and the chart's appVersion check."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sine-retrieval")
except PackageNotFoundError:          # a copy of the tree that was never installed
    __version__ = "0.0.0+unknown"
