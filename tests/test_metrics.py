"""Tests for evaluation.metrics (retrieval Recall@K, run summaries and formatting)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.metrics import format_metrics, format_summary, retrieval_metrics, summarize_runs
from evaluation.metrics_reference import reference_metrics

DEFAULT_KEYS = [
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "img_r1",
    "img_r5",
    "img_r10",
    "txt_r_mean",
    "img_r_mean",
    "r_mean",
]


def random_txt2img(rng: np.random.Generator, num_images: int, num_captions: int) -> np.ndarray:
    """Random caption->image assignment with >= 1 caption per image and uneven counts."""
    assert num_captions >= num_images
    extra = rng.integers(0, num_images, size=num_captions - num_images)
    txt2img = np.concatenate([np.arange(num_images), extra])
    rng.shuffle(txt2img)
    return txt2img


# --------------------------------------------------------------------------- #
# Hand-worked examples
# --------------------------------------------------------------------------- #
# 3 images, 6 captions: image 0 owns captions 0,1,2; image 1 owns caption 3;
# image 2 owns captions 4,5.
HAND_TXT2IMG = [0, 0, 0, 1, 2, 2]
HAND_SCORES = [
    #  c0    c1    c2    c3    c4    c5
    [0.10, 0.90, 0.30, 0.80, 0.20, 0.95],  # image 0
    [0.50, 0.40, 0.70, 0.60, 0.90, 0.10],  # image 1
    [0.30, 0.20, 0.10, 0.00, 0.40, 0.50],  # image 2
]
# TR (rows):
#   image 0: descending order c5 .95, c1 .90, c3 .80, c2 .30, c4 .20, c0 .10
#            own captions c1 (rank 1), c2 (rank 3), c0 (rank 5) -> best rank 1
#   image 1: own caption c3 = .60; higher: c4 .90, c2 .70          -> rank 2
#   image 2: own c4 = .40, c5 = .50; c5 is the row maximum          -> rank 0
#   TR ranks [1, 2, 0]: R@1 = 1/3, R@2 = 2/3, R@5 = R@10 = 3/3.
# IR (columns):
#   c0 [.10 .50 .30] true img 0 (.10): higher .50, .30 -> rank 2
#   c1 [.90 .40 .20] true img 0 (.90)                  -> rank 0
#   c2 [.30 .70 .10] true img 0 (.30): higher .70      -> rank 1
#   c3 [.80 .60 .00] true img 1 (.60): higher .80      -> rank 1
#   c4 [.20 .90 .40] true img 2 (.40): higher .90      -> rank 1
#   c5 [.95 .10 .50] true img 2 (.50): higher .95      -> rank 1
#   IR ranks [2, 0, 1, 1, 1, 1]: R@1 = 1/6, R@2 = 5/6, R@5 = R@10 = 6/6.
# Default ks: txt_r_mean = (100/3 + 100 + 100) / 3 = 700/9 = 77.78
#             img_r_mean = (100/6 + 100 + 100) / 3 = 650/9 = 72.22
#             r_mean     = (700/9 + 650/9) / 2     = 75.0


def test_hand_worked_example_default_ks():
    scores = torch.tensor(HAND_SCORES, dtype=torch.float64)
    txt2img = torch.tensor(HAND_TXT2IMG)
    m = retrieval_metrics(scores, txt2img)
    assert list(m) == DEFAULT_KEYS
    expected = {
        "txt_r1": 100 / 3,
        "txt_r5": 100.0,
        "txt_r10": 100.0,
        "img_r1": 100 / 6,
        "img_r5": 100.0,
        "img_r10": 100.0,
        "txt_r_mean": 700 / 9,
        "img_r_mean": 650 / 9,
        "r_mean": 75.0,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
        assert type(m[key]) is float


def test_hand_worked_example_custom_ks():
    scores = torch.tensor(HAND_SCORES, dtype=torch.float32)
    txt2img = torch.tensor(HAND_TXT2IMG)
    m = retrieval_metrics(scores, txt2img, ks=(1, 2))
    assert list(m) == ["txt_r1", "txt_r2", "img_r1", "img_r2", "txt_r_mean", "img_r_mean", "r_mean"]
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r2"] == pytest.approx(200 / 3)
    assert m["img_r1"] == pytest.approx(100 / 6)
    assert m["img_r2"] == pytest.approx(500 / 6)
    assert m["txt_r_mean"] == pytest.approx(50.0)  # (100/3 + 200/3) / 2
    assert m["img_r_mean"] == pytest.approx(50.0)  # (100/6 + 500/6) / 2
    assert m["r_mean"] == pytest.approx(50.0)


# --------------------------------------------------------------------------- #
# Ties: the stable-descending rule (lower index wins) decides.
# --------------------------------------------------------------------------- #
def test_all_ties_lower_index_wins():
    # 2 images, 4 captions: image 0 owns c0, c1; image 1 owns c2, c3. Every score equal.
    scores = torch.ones(2, 4)
    txt2img = torch.tensor([0, 0, 1, 1])
    m = retrieval_metrics(scores, txt2img, ks=(1, 2, 3))
    # TR: row order is c0, c1, c2, c3. Image 0: c0 at rank 0 -> hit at K=1.
    #     Image 1: c2 at rank 2, c3 at rank 3 -> best 2: miss at K=1,2; hit at K=3.
    assert m["txt_r1"] == 50.0
    assert m["txt_r2"] == 50.0
    assert m["txt_r3"] == 100.0
    # IR: every column orders image 0 before image 1. Captions of image 0 -> rank 0,
    #     captions of image 1 -> rank 1: 2/4 hits at K=1, all hits at K>=2.
    assert m["img_r1"] == 50.0
    assert m["img_r2"] == 100.0
    assert m["img_r3"] == 100.0


def test_partial_ties_with_higher_scores():
    # 3 images, 3 captions (caption t belongs to image t).
    scores = torch.tensor(
        [
            [2.0, 5.0, 2.0],  # image 0: c0 = 2 ties with c2; c1 = 5 above -> rank 1
            [5.0, 1.0, 5.0],  # image 1: c1 = 1 below c0 and c2             -> rank 2
            [3.0, 1.0, 3.0],  # image 2: c2 = 3 ties with c0 (lower index)  -> rank 1
        ]
    )
    txt2img = torch.tensor([0, 1, 2])
    m = retrieval_metrics(scores, txt2img, ks=(1, 2))
    # TR ranks [1, 2, 1]: R@1 = 0/3, R@2 = 2/3.
    assert m["txt_r1"] == 0.0
    assert m["txt_r2"] == pytest.approx(200 / 3)
    # IR: c0 column [2, 5, 3], true img 0 = 2 -> rank 2
    #     c1 column [5, 1, 1], true img 1 = 1, tie with img 2 (higher index), below img 0 -> rank 1
    #     c2 column [2, 5, 3], true img 2 = 3, below img 1 -> rank 1
    # IR ranks [2, 1, 1]: R@1 = 0/3, R@2 = 2/3.
    assert m["img_r1"] == 0.0
    assert m["img_r2"] == pytest.approx(200 / 3)


def test_tie_between_two_own_captions_and_a_foreign_one():
    # 1 row view: image 0 owns c1, c2; image 1 owns c0. Row 0 = [7, 7, 7]:
    # stable order c0, c1, c2 -> image 0's best caption c1 is at rank 1 (c0 wins the tie).
    scores = torch.tensor([[7.0, 7.0, 7.0], [0.0, 0.0, 0.0]])
    txt2img = torch.tensor([1, 0, 0])
    m = retrieval_metrics(scores, txt2img, ks=(1, 2))
    # Image 1 row [0, 0, 0]: its caption c0 is first -> rank 0. TR ranks [1, 0].
    assert m["txt_r1"] == 50.0
    assert m["txt_r2"] == 100.0
    # IR: c0 column [7, 0], true img 1 -> rank 1; c1, c2 columns [7, 0], true img 0 -> rank 0.
    assert m["img_r1"] == pytest.approx(200 / 3)
    assert m["img_r2"] == 100.0


def test_signed_zero_and_infinities_tie_like_numpy():
    scores = torch.tensor(
        [
            [-0.0, 0.0, float("inf"), float("-inf")],
            [0.0, -0.0, float("inf"), float("inf")],
        ],
        dtype=torch.float64,
    )
    txt2img = torch.tensor([1, 0, 0, 1])
    expected = reference_metrics(scores.numpy(), txt2img.numpy(), ks=(1, 2, 3))
    assert retrieval_metrics(scores, txt2img, ks=(1, 2, 3)) == expected


# --------------------------------------------------------------------------- #
# Brute force against the per-row numpy reference
# --------------------------------------------------------------------------- #
SHAPES = [(1, 1), (1, 4), (2, 2), (3, 7), (5, 25), (8, 13), (17, 40), (30, 150), (41, 97)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brute_force_integer_scores_many_ties(shape, seed):
    num_images, num_captions = shape
    rng = np.random.default_rng(1000 * seed + num_images * 7 + num_captions)
    txt2img = random_txt2img(rng, num_images, num_captions)
    # Few distinct values -> lots of ties, both inside rows and columns.
    scores = rng.integers(-3, 4, size=shape).astype(np.float64)
    expected = reference_metrics(scores, txt2img)
    for dtype in (torch.float64, torch.float32):
        for chunk_size in (1, 3, 1000):
            got = retrieval_metrics(
                torch.tensor(scores, dtype=dtype), torch.from_numpy(txt2img), chunk_size=chunk_size
            )
            assert got == expected, (dtype, chunk_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_brute_force_float_scores(dtype, seed):
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(5, 40))
    if seed % 2 == 0:  # the usual layout: 5 consecutive captions per image
        num_captions = 5 * num_images
        txt2img = np.arange(num_captions) // 5
    else:  # uneven caption counts in random order
        num_captions = int(rng.integers(num_images, 6 * num_images))
        txt2img = random_txt2img(rng, num_images, num_captions)
    scores_t = torch.from_numpy(rng.standard_normal((num_images, num_captions))).to(dtype)
    # The reference sees exactly the same (possibly rounded) values.
    expected = reference_metrics(scores_t.double().numpy(), txt2img, ks=(1, 2, 5, 10))
    for chunk_size in (3, 7, num_images, 10_000):
        got = retrieval_metrics(
            scores_t, torch.from_numpy(txt2img), ks=(1, 2, 5, 10), chunk_size=chunk_size
        )
        assert got == expected, chunk_size


def test_brute_force_float16_and_integer_index_dtypes():
    rng = np.random.default_rng(7)
    txt2img = random_txt2img(rng, 12, 50)
    scores = torch.from_numpy(rng.standard_normal((12, 50))).half()  # float16 rounding -> ties
    expected = reference_metrics(scores.double().numpy(), txt2img)
    assert retrieval_metrics(scores, torch.from_numpy(txt2img).int(), chunk_size=5) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brute_force_sparse_ties_mixed_with_distinct_scores(seed):
    """Mostly distinct floats plus a few injected exact ties (fast path and tie-break mix)."""
    rng = np.random.default_rng(100 + seed)
    num_images, num_captions = 23, 90
    txt2img = random_txt2img(rng, num_images, num_captions)
    scores = rng.standard_normal((num_images, num_captions))
    for _ in range(15):
        # IR tie: another image gets exactly the true pair's score in a caption column.
        t = int(rng.integers(num_captions))
        scores[int(rng.integers(num_images)), t] = scores[txt2img[t], t]
        # TR tie: another caption in an image row gets exactly a ground-truth score.
        i = int(rng.integers(num_images))
        own = np.flatnonzero(txt2img == i)
        scores[i, int(rng.integers(num_captions))] = scores[i, int(rng.choice(own))]
    expected = reference_metrics(scores, txt2img, ks=(1, 2, 3, 5))
    for chunk_size in (None, 2, 5, 100):
        got = retrieval_metrics(
            torch.from_numpy(scores),
            torch.from_numpy(txt2img),
            ks=(1, 2, 3, 5),
            chunk_size=chunk_size,
        )
        assert got == expected, chunk_size


def test_default_chunking_with_several_slabs(monkeypatch):
    """chunk_size=None splits rows by a target element count; force several slabs."""
    import evaluation.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "_AUTO_CHUNK_ELEMENTS", 100)  # -> 100 // 40 = 2 rows
    rng = np.random.default_rng(11)
    txt2img = random_txt2img(rng, 9, 40)
    scores = rng.integers(0, 4, size=(9, 40)).astype(np.float32)
    expected = reference_metrics(scores, txt2img)
    assert retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(txt2img)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    txt2img = torch.from_numpy(random_txt2img(rng, 30, 140))
    scores = torch.from_numpy(rng.integers(-2, 3, size=(30, 140)).astype(np.float32))
    expected = retrieval_metrics(scores, txt2img, chunk_size=7)
    assert retrieval_metrics(scores.cuda(), txt2img.cuda(), chunk_size=7) == expected
    assert retrieval_metrics(scores.cuda(), txt2img, chunk_size=7) == expected


def test_non_contiguous_scores():
    rng = np.random.default_rng(3)
    txt2img = random_txt2img(rng, 9, 30)
    base = torch.from_numpy(rng.integers(0, 3, size=(30, 9)).astype(np.float32))
    scores = base.t()  # [9, 30], not contiguous
    assert not scores.is_contiguous()
    expected = reference_metrics(scores.double().numpy(), txt2img)
    assert retrieval_metrics(scores, torch.from_numpy(txt2img), chunk_size=4) == expected


def test_requires_grad_input_is_accepted():
    scores = torch.tensor(HAND_SCORES, requires_grad=True)
    m = retrieval_metrics(scores, torch.tensor(HAND_TXT2IMG))
    assert m["r_mean"] == pytest.approx(75.0)


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("scores", "txt2img", "match"),
    [
        (torch.zeros(4), torch.tensor([0, 0, 0, 0]), r"scores must be 2-D"),
        (torch.zeros(1, 2, 3), torch.tensor([0, 0]), r"scores must be 2-D"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), r"txt2img has length 2 .* 3 captions"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 1, 0]), r"txt2img has length 4"),
        (torch.zeros(2, 3), torch.tensor([[0, 1, 1]]), r"txt2img must be 1-D"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0, 1.0]), r"integer dtype"),
        (torch.zeros(2, 3), torch.tensor([0, 2, 1]), r"indices must lie in \[0, 1\]"),
        (torch.zeros(2, 3), torch.tensor([0, -1, 1]), r"indices must lie in \[0, 1\]"),
        (torch.zeros(3, 3), torch.tensor([0, 0, 2]), r"1 image\(s\) have no caption.*1"),
        (torch.zeros(2, 0), torch.zeros(0, dtype=torch.long), r"image\(s\) have no caption"),
        (torch.zeros(0, 3), torch.tensor([0, 0, 0]), r"no images"),
        (
            torch.tensor([[0.0, float("nan")], [1.0, 2.0]]),
            torch.tensor([0, 1]),
            r"scores contains NaN",
        ),
        (
            torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]], dtype=torch.float16),
            torch.tensor([0, 1, 1]),
            r"scores contains NaN",
        ),
        (torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]), r"floating-point dtype"),
        (torch.zeros(2, 2, dtype=torch.complex64), torch.tensor([0, 1]), r"floating-point dtype"),
    ],
)
def test_bad_inputs_raise(scores, txt2img, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(scores, txt2img)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("position", [(0, 0), (17, 150), (39, 299), (39, 0)])
def test_nan_anywhere_is_detected(dtype, position):
    scores = torch.randn(40, 300).to(dtype)
    scores[0, 1] = float("inf")
    scores[1, 2] = float("-inf")
    scores[position] = float("nan")
    with pytest.raises(ValueError, match=r"scores contains NaN"):
        retrieval_metrics(scores, torch.arange(300) % 40)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ks": ()}, r"at least one K"),
        ({"ks": (1, 0)}, r"positive int"),
        ({"ks": (1, 2.5)}, r"positive int"),
        ({"ks": (5, 5)}, r"duplicates"),
        ({"chunk_size": 0}, r"chunk_size must be a positive int"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(torch.tensor(HAND_SCORES), torch.tensor(HAND_TXT2IMG), **kwargs)


# --------------------------------------------------------------------------- #
# Formatting and run summaries
# --------------------------------------------------------------------------- #
def test_format_metrics_order_and_precision():
    m = retrieval_metrics(torch.tensor(HAND_SCORES), torch.tensor(HAND_TXT2IMG))
    assert format_metrics(m) == (
        "IR@1 16.67 IR@5 100.00 IR@10 100.00 TR@1 33.33 TR@5 100.00 TR@10 100.00 r_mean 75.00"
    )


def test_summarize_runs_and_format_summary():
    runs = [
        {"img_r1": 10.0, "txt_r1": 20.0, "r_mean": 15.0},
        {"img_r1": 14.0, "txt_r1": 20.0, "r_mean": 17.0},
    ]
    summary = summarize_runs(runs)
    assert list(summary) == ["img_r1", "txt_r1", "r_mean"]
    # img_r1: mean 12, population std sqrt(((10-12)^2 + (14-12)^2) / 2) = 2.
    assert summary["img_r1"] == {"mean": 12.0, "std": 2.0, "runs": [10.0, 14.0]}
    assert summary["txt_r1"] == {"mean": 20.0, "std": 0.0, "runs": [20.0, 20.0]}
    # r_mean: mean 16, std sqrt((1 + 1) / 2) = 1.
    assert summary["r_mean"] == {"mean": 16.0, "std": 1.0, "runs": [15.0, 17.0]}
    assert format_summary(summary) == "IR@1 12.00 ± 2.00 TR@1 20.00 ± 0.00 r_mean 16.00 ± 1.00"


def test_summarize_three_runs_and_single_run():
    values = [1.0, 2.0, 4.0]  # mean 7/3, population variance (16/9 + 1/9 + 25/9) / 3 = 14/9
    summary = summarize_runs([{"r_mean": v} for v in values])
    assert summary["r_mean"]["mean"] == pytest.approx(7 / 3)
    assert summary["r_mean"]["std"] == pytest.approx(math.sqrt(14 / 9))
    assert summary["r_mean"]["runs"] == values

    single = summarize_runs([{"img_r1": 3.5, "r_mean": 1.25}])
    assert single["img_r1"] == {"mean": 3.5, "std": 0.0, "runs": [3.5]}


def test_format_summary_full_metric_dicts():
    m = retrieval_metrics(torch.tensor(HAND_SCORES), torch.tensor(HAND_TXT2IMG))
    text = format_summary(summarize_runs([m, m]))
    assert text == (
        "IR@1 16.67 ± 0.00 IR@5 100.00 ± 0.00 IR@10 100.00 ± 0.00 "
        "TR@1 33.33 ± 0.00 TR@5 100.00 ± 0.00 TR@10 100.00 ± 0.00 r_mean 75.00 ± 0.00"
    )


def test_summarize_runs_bad_input():
    with pytest.raises(ValueError, match=r"at least one run"):
        summarize_runs([])
    with pytest.raises(ValueError, match=r"run 1 has keys"):
        summarize_runs([{"r_mean": 1.0}, {"img_r1": 1.0}])


def test_format_table_rows_columns_and_alignment():
    from evaluation.metrics import format_table

    a = summarize_runs([{"img_r1": 1.0, "txt_r1": 3.0, "r_mean": 2.0}, {"img_r1": 3.0, "txt_r1": 5.0, "r_mean": 4.0}])
    b = summarize_runs([{"img_r1": 10.0, "txt_r1": 30.0, "r_mean": 20.0}])
    lines = format_table({"distilled-100": a, "full": b}).splitlines()
    assert lines[0].split() == ["set", "IR@1", "TR@1", "r_mean"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["distilled-100", "2.00", "±", "1.00", "4.00", "±", "1.00", "3.00", "±", "1.00"]
    assert lines[3].split() == ["full", "10.00", "±", "0.00", "30.00", "±", "0.00", "20.00", "±", "0.00"]
    assert len({len(line) for line in lines}) == 1  # every row padded to the same width
