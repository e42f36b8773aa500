"""Shared helpers: atomic writes, input errors, visualizer, checkpoints, HTML pages, plots."""
