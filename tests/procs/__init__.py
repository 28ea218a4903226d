"""Helpers and worker scripts for tests that run real processes."""
