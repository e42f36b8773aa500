"""Losses, one family per file; each returns a scalar tensor (models collect them in a dict)."""
