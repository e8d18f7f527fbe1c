"""Every derived random seed of the project, in one place, so that no two streams collide by accident.

The experts, the models that judge a set, the models that tune its learning rate and the
evaluations during distillation each draw from their own range: a model seeded like an expert
would start at the very point the distilled data was matched from and score far higher than a
fresh one (BENCHMARKS.md §7 shows it), which is not what a set is judged on.
"""

EXPERT_STRIDE = 100_003  # expert n of a run with --seed s: s * EXPERT_STRIDE + n
EVAL_MODEL_OFFSET = 1_000_000_007  # evaluation model k is initialised from EVAL_MODEL_OFFSET + its seed
TUNING_SEED_OFFSET = 500_000  # learning-rate tuning models: their seeds start here above the run's seed
DISTILL_EVAL_OFFSET = 1_000_003  # distill.py's evaluation at iteration i: seed + DISTILL_EVAL_OFFSET + i
SEGMENT_STREAM_STRIDE = 7_919_993  # distill.py's segment stream s >= 1 (slot 0 is the run's own generator)


def expert_seed(seed: int, number: int) -> int:
    return seed * EXPERT_STRIDE + number


def eval_model_seed(seed: int) -> int:
    return EVAL_MODEL_OFFSET + seed


def distill_eval_seed(seed: int, iteration: int) -> int:
    return seed + DISTILL_EVAL_OFFSET + iteration


def segment_stream_seed(seed: int, slot: int, iteration: int = 0) -> int:
    """The seed of distill.py's segment stream `slot` (>= 1) started at `iteration` (0 for a fresh run; a run
    resumed with more streams than it saved starts the new ones at the iteration it resumes from)."""
    return (seed * SEGMENT_STREAM_STRIDE + slot * 1_000_033 + iteration) % 2**63
