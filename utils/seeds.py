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
# evaluate.py --coreset forgetting: the model that counts forgetting events (its weights, dropout, batch order)
FORGETTING_SEED_OFFSET = 2_000_000_011
# The model whose embeddings choose a herding, k-center or k-means coreset (what an expert's weights do not set)
CORESET_PROBE_OFFSET = 3_000_000_019
# Both sit above every evaluation seed of a run, and differ from its expert seeds for experts below 40,000
# (2_000_000_011 and 3_000_000_019 leave remainders 60,013 and 40,021 modulo EXPERT_STRIDE - 1).
# distill.py's learned similarity (LoRS): the generator of its initial parameters (the low-rank factor L), apart
# from the run's own generator, so that the run draws the same segments, minibatches and augmentations whatever
# --sim_type
SIMILARITY_INIT_OFFSET = 4_000_000_007


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


def forgetting_seed(seed: int) -> int:
    """The forgetting model's seed (weights and batch order). It was the plain --seed, which for --seed 0 is
    expert 0's seed: the model counting forgetting events was that expert, trained again."""
    return FORGETTING_SEED_OFFSET + seed


def coreset_probe_seed(seed: int) -> int:
    """The seed of the model that embeds the training pairs for a coreset (it was the plain --seed)."""
    return CORESET_PROBE_OFFSET + seed


def similarity_init_seed(seed: int) -> int:
    """The seed of the generator that draws distill.py's initial similarity parameters (they came from the run's
    generator, which then drew other segments and minibatches than the same run without a similarity)."""
    return SIMILARITY_INIT_OFFSET + seed
