"""shardscore: score WebDataset image shards with an image model, one Parquet row per image."""

__version__ = "0.1.0"
