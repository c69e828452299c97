"""corelab kernel: settings, store, DICOM I/O, SUV and audit; imports nothing above it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("corelab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
