"""c3diff.pp."""
