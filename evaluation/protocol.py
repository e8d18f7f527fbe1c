"""Judging a set of image-text pairs (distilled or real): train fresh models on it, test retrieval.

The protocol, used by distill.py during distillation and by evaluate.py afterwards: fresh models
(each from its own seed) train for `epoch_eval_train` epochs with SGD (momentum 0.9, weight decay
5e-4, one learning rate for the image side and the text head, ×0.1 half way through), batch
`eval_batch`, then retrieval is measured; every metric is reported as mean ± std over the models.
A distilled set judged at its own learned step sizes trains the image side at the one and the text head
at the other (`lr_txt`), as LoRS and RepBlend evaluate theirs; a learning rate given or chosen from a grid
is one rate for both.

Choices are made on the selection split (`--eval_split`, val by default), never on the split the
final numbers are reported on: with a grid of learning rates (and of epochs: multiples of the set's
number of epochs), `tune_models` models per cell train and are scored on the selection split, the
grid is widened past its edge where the best cell sits on one (evaluation/grid.py), the best cell
wins, and `num_eval` fresh models (other seeds) train with it and are tested on the report split
(test when it exists). Every set judged this way gets the same grid and the same widening rule.

With a frozen trunk (networks/split.py) the models train over trunk outputs: a set's pixels go
through the trunk once, the training split's outputs come from the cache (data/model_inputs.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from data.build import has_split
from data.feature_cache import FeatureBatches
from data.model_inputs import ModelInputs, trunk_outputs_of
from networks import build_model
from settings.base import WEIGHT_LR_MAX
from settings.data import DataSettings
from settings.model import ModelSettings
from settings.protocol import ProtocolSettings
from utils.cli import UserError
from utils.device import seed_everything
from utils.distributed import ProcessGroupInfo, gather_objects
from utils.rng import global_streams_kept
from utils.seeds import TUNING_SEED_OFFSET, eval_model_seed
from utils.dsa import dsa_augment
from evaluation import grid
from evaluation.metrics import summarize_runs
from evaluation.training import (TrainingWatch, evaluate_retrieval, scale_learning_rates, sgd_pair, train_one_epoch,
                                 trainable_copy)

EVAL_MOMENTUM = 0.9
EVAL_WEIGHT_DECAY = 5e-4


def _pairs_loader(images, texts, batch_size: int, seed: int, dsa_strategy: str | None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    counter = iter(range(1 << 62))

    def collate(items):
        batch_images = torch.stack([i for i, _, _ in items])
        batch_texts = torch.stack([t for _, t, _ in items])
        indices = torch.stack([k for _, _, k in items])
        if dsa_strategy:
            batch_images = dsa_augment(batch_images, dsa_strategy, seed * 7919 + next(counter))
        return batch_images, batch_texts, indices

    drop_last = len(images) % batch_size == 1 and len(images) > 1  # a batch of one has no negatives
    return DataLoader(TensorDataset(images, texts, torch.arange(len(images))), batch_size=batch_size, shuffle=True,
                      generator=generator, drop_last=drop_last, collate_fn=collate)


def lr_label(lr: float, lr_txt: float | None = None) -> str:
    """`lr 0.1`, or `lr 0.1 (text head 0.05)` when the text head trains at another rate."""
    return f"lr {lr:.4g}" + (f" (text head {lr_txt:.4g})" if lr_txt is not None and lr_txt != lr else "")


def train_fresh_model(settings: ModelSettings, protocol: ProtocolSettings, loader, lr: float, text_dim: int,
                      device: torch.device, seed: int, similarity: torch.Tensor | None = None,
                      epochs: int | None = None, lr_txt: float | None = None):
    """A fresh model (built from `settings`) trained on `loader` batches with the evaluation protocol, with
    the model's loss, against `similarity[idx, idx]` when the set has a learned similarity; returns the model
    and why it did not train (evaluation.training.TrainingWatch), or None when it did. The image side trains
    at `lr`, the text head at `lr_txt` (default: `lr`).

    The model's initialisation and dropout come from its own seed; the caller's global random streams are
    left as they were (an evaluation during distillation must not change what is learned next)."""
    with global_streams_kept():
        seed_everything(eval_model_seed(seed))
        model = build_model(settings, text_dim).to(device)
        optimizers = sgd_pair(model, lr, lr if lr_txt is None else lr_txt, EVAL_MOMENTUM, EVAL_WEIGHT_DECAY)
        epochs = protocol.epoch_eval_train if epochs is None else epochs
        start, watch = trainable_copy(model), TrainingWatch(every_step=False)
        for epoch in range(epochs):
            if epoch == epochs // 2:
                scale_learning_rates(optimizers, 0.1)
            train_one_epoch(model, loader, optimizers, device, progress=False,
                            loss_type=settings.loss_type, similarity=similarity, watch=watch)
    return model, watch.problem(start, trainable_copy(model))


def evaluate_models(settings: ModelSettings, protocol: ProtocolSettings, make_loader: Callable[[int], object], lr: float, inputs: ModelInputs, device: torch.device,
                    num_eval: int, seed: int, progress: bool = True, similarity: torch.Tensor | None = None,
                    splits: tuple[str, ...] | None = None, group: ProcessGroupInfo | None = None,
                    untrained: list[dict] | None = None, lr_txt: float | None = None,
                    epochs: int | None = None) -> dict[str, dict]:
    """Per split (default: the selection split), mean, std and per-run values of every retrieval metric over
    `num_eval` freshly trained models (image side at `lr`, text head at `lr_txt`, default `lr`, for `epochs`
    epochs, default the protocol's); model `k` is
    seeded with `seed + k` and trains on `make_loader(seed + k)`.
    Each model that did not train is appended to `untrained` as {"lr", "lr_txt", "seed", "problem"}.
    Under torchrun (`group`), the models are shared out over the processes and their results gathered: the
    same numbers as one process training all of them (a collective: every process must call it)."""
    splits = splits or (inputs.data.eval_name,)
    group = group or ProcessGroupInfo()
    mine = {name: {} for name in splits}
    problems = {}
    lr_txt = lr if lr_txt is None else lr_txt
    bar = tqdm(group.my_share(num_eval), desc=f"evaluation models ({lr_label(lr, lr_txt)})", unit="model",
               leave=False, disable=not progress)
    for run in bar:
        model, problem = train_fresh_model(settings, protocol, make_loader(seed + run), lr, inputs.data.text_dim,
                                           device, seed + run, similarity, epochs=epochs, lr_txt=lr_txt)
        if problem:
            problems[run] = problem
        for name in splits:
            split = inputs.data.split(name)
            mine[name][run] = evaluate_retrieval(model, inputs.eval_images(name), split.text, split.txt2img, device,
                                                 progress=False)
        bar.set_postfix(r_mean=f"{mine[splits[0]][run]['r_mean']:.2f}")
    everyone = {name: {k: v for share in gather_objects(mine[name], group) for k, v in share.items()} for name in splits}
    problems = {k: v for share in gather_objects(problems, group) for k, v in share.items()}
    if untrained is not None:
        untrained.extend({"lr": lr, "lr_txt": lr_txt, "epochs": epochs or protocol.epoch_eval_train, "seed": seed + k,
                          "problem": problems[k]}
                         for k in sorted(problems))
    return {name: summarize_runs([runs[k] for k in range(num_eval)]) for name, runs in everyone.items()}


def judge(settings: ModelSettings, protocol: ProtocolSettings, make_loader: Callable[[int], object], lrs: list[float], inputs: ModelInputs, device: torch.device,
          num_eval: int, seed: int, report_split: str | None = None, tune_models: int = 1, progress: bool = True,
          similarity: torch.Tensor | None = None, lr_txt: float | None = None, epochs: list[int] | None = None,
          widen: int = 0) -> dict:
    """The protocol with its choices: the learning rate from `lrs` and the number of epochs from `epochs`
    (default: the protocol's) by `tune_models` models per cell on the selection split, the grid widened past its
    edges by up to `widen` cells (evaluation/grid.py; no tuning for a single cell), then `num_eval` models with
    that choice, reported on `report_split` (default: the selection split) and on the selection split. `lr_txt`
    (a set's learned text step size, with its image step size the single value of `lrs`) trains the text head at
    another rate.

    Returns {"metrics": report-split summary, "split": its name, "lr": the rate used (the image side's),
    "lr_txt": the text head's, "epochs": the epochs used, "tuning": [{"lr", "epochs", "r_mean"} per cell scored],
    "widened", "at_edge" (evaluation.grid.GridChoice), "selection_metrics": the final models on the selection
    split, "untrained_models": the models, tuning ones included, that did not train ({"lr", "lr_txt", "seed",
    "problem"})}."""
    if lr_txt is not None and len(lrs) > 1:
        raise ValueError("a separate text-head rate goes with one image rate, not a grid to choose from")
    select = inputs.data.eval_name
    report = report_split or select
    epochs = epochs or [protocol.epoch_eval_train]
    untrained = []

    def score(lr: float, cell_epochs: int) -> float:
        summary = evaluate_models(settings, protocol, make_loader, lr, inputs, device, tune_models,
                                  seed + TUNING_SEED_OFFSET, progress, similarity, untrained=untrained, lr_txt=lr_txt,
                                  epochs=cell_epochs)[select]
        if progress:
            tqdm.write(f"  {lr_label(lr, lr_txt)}, {cell_epochs} epochs: r_mean on {select} "
                       f"{summary['r_mean']['mean']:.2f} ({tune_models} model{'s' if tune_models > 1 else ''})")
        return summary["r_mean"]["mean"]

    if len(set(lrs)) * len(set(epochs)) > 1:
        choice = grid.search(lrs, epochs, score, widen, lr_max=WEIGHT_LR_MAX)
    else:
        choice = grid.GridChoice(lrs[0], epochs[0])
    lr_txt = choice.lr if lr_txt is None else lr_txt
    summaries = evaluate_models(settings, protocol, make_loader, choice.lr, inputs, device, num_eval, seed, progress,
                                similarity, splits=tuple(dict.fromkeys((report, select))), untrained=untrained,
                                lr_txt=lr_txt, epochs=choice.epochs)
    return {"metrics": summaries[report], "split": report, "lr": choice.lr, "lr_txt": lr_txt, "epochs": choice.epochs,
            "tuning": choice.cells, "widened": choice.widened, "at_edge": choice.at_edge,
            "selection_metrics": summaries[select], "untrained_models": untrained}


def untrained_warning(untrained: list[dict], models: int) -> str | None:
    """The loud line saying which evaluation models did not train (of `models` trained in all), or None."""
    if not untrained:
        return None
    first = untrained[0]
    return (f"WARNING: {len(untrained)} of {models} evaluation models did not train, so their numbers are those of "
            f"untrained models (first: {lr_label(first['lr'], first.get('lr_txt'))}, seed {first['seed']}: "
            f"{first['problem']})")


def reported_split(data_settings: DataSettings, asked: str) -> str:
    """The split the final numbers are reported on: `asked` (its annotation file must be there), or for `auto`
    the test split when its annotation file is there, else the selection split (`--eval_split`)."""
    if asked != "auto":
        if asked != data_settings.eval_split and not has_split(data_settings, asked):
            raise UserError(f"--report_split {asked}: its annotation file is not in the annotation folder")
        return asked
    return "test" if data_settings.eval_split != "test" and has_split(data_settings, "test") else data_settings.eval_split


def pair_batches(protocol: ProtocolSettings, model, inputs: ModelInputs, device: torch.device, texts: torch.Tensor,
                 images: torch.Tensor | None = None, trunk_outputs: torch.Tensor | None = None
                 ) -> Callable[[int], object]:
    """`make_loader(seed)` over a fixed set of pairs: pixels (a distilled set, a coreset) or trunk outputs (a
    feature-level set). With a frozen trunk and no pixel augmentation the pixels go through the trunk once
    and the models train over its outputs; `model` (any model of this run's structure) supplies the trunk."""
    texts = texts.detach().cpu()
    strategy = protocol.augmentation
    if trunk_outputs is None and model.has_trunk and strategy is None:
        trunk_outputs = trunk_outputs_of(model, images, device)
    if trunk_outputs is not None:
        outputs = trunk_outputs.detach().cpu().unsqueeze(0)
        return lambda s: FeatureBatches(outputs, torch.arange(len(texts)), texts, protocol.eval_batch, s)
    images = images.detach().cpu()
    return lambda s: _pairs_loader(images, texts, protocol.eval_batch, s, strategy)


def evaluate_pairs(settings: ModelSettings, protocol: ProtocolSettings, images: torch.Tensor, texts: torch.Tensor, lr: float, inputs: ModelInputs,
                   device: torch.device, num_eval: int, seed: int, progress: bool = True,
                   similarity: torch.Tensor | None = None, model=None, group: ProcessGroupInfo | None = None,
                   untrained: list[dict] | None = None, lr_txt: float | None = None) -> dict:
    """The protocol at one learning rate (image side `lr`, text head `lr_txt`, default `lr`) on a fixed set of
    (image tensor, text embedding) pairs, on the selection split: a distilled set or a coreset, with its learned
    [N, N] target similarity if it has one (models that did not train are appended to `untrained`, see
    evaluate_models)."""
    model = model if model is not None else build_model(settings, inputs.data.text_dim)
    similarity = None if similarity is None else similarity.detach().to(device)
    make_loader = pair_batches(protocol, model, inputs, device, texts, images)
    return evaluate_models(settings, protocol, make_loader, lr, inputs, device, num_eval, seed, progress,
                           similarity, group=group, untrained=untrained, lr_txt=lr_txt)[inputs.data.eval_name]
