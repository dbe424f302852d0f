"""c3diff.tl."""
