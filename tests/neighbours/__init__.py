"""Helpers of tests/test_neighbours.py: stand-ins that fail on a timetable, and `replyclock run` as a process."""
