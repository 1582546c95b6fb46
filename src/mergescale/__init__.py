"""mergescale: benchmark model merging at scale."""

__version__ = "0.1.0"
