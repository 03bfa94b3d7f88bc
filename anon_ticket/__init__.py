"""anon-ticket: anonymous access tickets sold for Monero."""

__version__ = "0.1.0"
