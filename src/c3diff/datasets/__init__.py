"""c3diff.datasets."""
