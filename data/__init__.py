"""Data: annotation parsing, transforms, the embedded `shapes` set, text-embedding caches, loaders."""
