"""c3diff.metrics."""
