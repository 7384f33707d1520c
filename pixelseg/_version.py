"""The version alone, so every wing can record it without importing the package face."""

__version__ = "0.1.0"
