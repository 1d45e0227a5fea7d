"""Benchmarks: measured figures printed for the notes, never timed assertions."""
