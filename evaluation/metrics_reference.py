"""Retrieval ranks and Recall@K by the slow, obvious route: one stable numpy argsort per row and column.

The fast code in evaluation/metrics.py is checked against this in the tests and timed against it
in bench/bench_metrics.py; nothing else uses it.
"""
from __future__ import annotations

import numpy as np


def reference_ranks(scores: np.ndarray, txt2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best caption rank per image and true-image rank per caption, via per-row argsort."""
    num_images, num_captions = scores.shape
    txt_rank = np.empty(num_images, dtype=np.int64)
    for i in range(num_images):
        order = np.argsort(-scores[i], kind="stable")
        position = np.empty(num_captions, dtype=np.int64)
        position[order] = np.arange(num_captions)
        txt_rank[i] = position[txt2img == i].min()
    img_rank = np.empty(num_captions, dtype=np.int64)
    for t in range(num_captions):
        order = np.argsort(-scores[:, t], kind="stable")
        img_rank[t] = int(np.flatnonzero(order == txt2img[t])[0])
    return txt_rank, img_rank


def reference_metrics(
    scores: np.ndarray, txt2img: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    txt_rank, img_rank = reference_ranks(scores, txt2img)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * int((txt_rank < k).sum()) / len(txt_rank)
    for k in ks:
        out[f"img_r{k}"] = 100.0 * int((img_rank < k).sum()) / len(img_rank)
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
