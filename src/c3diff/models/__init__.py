"""c3diff.models."""
