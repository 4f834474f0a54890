"""Peer implementations run as subprocesses in their own virtual environments."""
