"""Docking-station side of the dock line: a small program for the board in the dock (and the simulator's dock)."""
