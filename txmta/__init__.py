"""txmta: a store-and-forward mail transfer agent on Twisted."""

__version__ = "0.1.0"
