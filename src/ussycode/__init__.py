"""ussycode: self-hosted dev environments over SSH."""

__version__ = "0.1.0"
