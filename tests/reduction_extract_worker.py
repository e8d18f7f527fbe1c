"""Feature extraction with the test's fake encoders, as one process or as one rank of a `torchrun` launch
(tests/test_reduction_shards.py runs it both ways and compares the stores).

usage: python reduction_extract_worker.py STORE_FOLDER SHARD [SHARD ...]
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from reduction.extract import extract_features, process_group_from_env
from reduction.feature_store import FeatureStore
from utils.distributed import shutdown

IDENTITY = {"image_encoder": "mean-colour", "text_encoder": "sha256", "image_size": 8}


def encode_images(images) -> np.ndarray:
    """Mean colour per channel, scaled to 0..1, repeated to 6 dims."""
    return np.stack([np.tile(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) / 255, 2) for image in images])


def encode_texts(captions) -> np.ndarray:
    """4 dims from the caption's SHA-256 (deterministic, different per caption)."""
    return np.stack([np.frombuffer(hashlib.sha256(caption.encode()).digest()[:4], dtype=np.uint8)
                     .astype(np.float32) / 255 for caption in captions])


def main(argv: list[str]) -> int:
    folder, shards = argv[0], argv[1:]
    group = process_group_from_env("cpu")
    store = FeatureStore(folder, IDENTITY)
    summary = extract_features(shards, store, encode_images, encode_texts, batch_size=2, rank=group.rank,
                               world_size=group.world_size, progress=False)
    print(f"rank {group.rank}: wrote {summary.parts_written}, reused {summary.parts_reused}, "
          f"index {'written' if summary.index else 'not written'}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
