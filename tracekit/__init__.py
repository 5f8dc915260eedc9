"""tracekit: capture, import, synthesise and inspect LoRA serving traces (Parquet)."""

__version__ = "0.1.0"
