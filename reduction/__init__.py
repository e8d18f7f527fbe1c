"""Data reduction: choose which of many real image-text pairs to keep (clustering, deduplication, filters)."""
