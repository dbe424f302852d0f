"""c3diff.io."""
