"""Data: the sample schema, benchmark loaders, the procedural world, collation."""

from mose.data.schema import DataError, Sample, read_jsonl, write_jsonl

__all__ = ["DataError", "Sample", "read_jsonl", "write_jsonl"]
