"""The crash harness of tests/test_crash.py: a growing X timeline, the kill loop, the invariants."""
