"""Body-worn camera agent: the device daemon (package `agent`, command `bwc-agent`)."""

__version__ = "0.1.0"
