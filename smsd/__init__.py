"""smsd: bank and wallet SMS in MongoDB → financial transactions, journal-first."""
__version__ = "0.1.0"
