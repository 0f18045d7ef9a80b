"""The evidence format, shared by the device and the bureau.

Everything about how records are encoded, signed and chained, how segments are encrypted, and how
all of it is verified lives here and only here (docs/FORMAT.md is its specification).
"""
