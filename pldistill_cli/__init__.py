"""pldistill: distil a large audio-language model into a small speech-emotion recogniser (PL-Distill)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pldistill")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
