"""c3diff.pl."""
