"""Export: atomic output folders, checkpoint saving, verification, provenance (``bakeedit.json``)."""
