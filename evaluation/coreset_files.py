"""Choosing evaluate.py's coresets with the files kept beside them (docs/evaluation-protocol.md, docs/file-formats.md).

A coreset is saved as a set file (--coreset_file, default runs/<dataset>/coresets/<method>_<N>_seed<seed>.pt)
together with the settings that chose it; a later run reuses the file when every setting that decides the
selection agrees (`SELECTION_KEYS` plus the method's `METHOD_KEYS`), and selects again otherwise. The
forgetting counts are kept in a file of their own beside it, since coresets of every size share them.

The methods that rank pairs by features (`FEATURE_METHODS`) take them from `selection_features`: a frozen
trunk's cached outputs beside the raw text embeddings, or else the joint embedding of a buffer expert.
`kmeans_coreset` is the k-means selection on those features that both `evaluate.py --coreset kmeans` and
`distill.py --pix_init kmeans` use.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.build import RetrievalData
from data.distilled_set import coreset_method, coreset_source, load_distilled_set, save_distilled_set, set_source
from data.model_inputs import ModelInputs
from evaluation import coresets, set_files
from evaluation.training import batch_note
from experts.files import check_buffer_matches, expected_metadata, locate_buffer, read_metadata
from networks import build_model, image_norm
from settings import DEFAULT_REAL_LR
from settings.choices import CENTROIDS
from settings.data import DataSettings
from settings.model import ModelSettings
from settings.programs import EvaluateSettings
from utils.cli import UserError
from utils.device import seed_everything
from utils.io import atomic_torch_save, safe_torch_load
from utils.seeds import coreset_probe_seed, forgetting_seed

# Settings that decide the forgetting counts (shared by coresets of every size).
FORGETTING_KEYS = ("seed", "model_seed", "dataset", "text_identity", "image_encoder", "image_size", "image_pretrained",
                   "image_weights", "forgetting_epochs", "forgetting_batch", "forgetting_lr_img", "forgetting_lr_txt",
                   "num_train_pairs")
# Settings that decide which pairs a coreset holds (per method); a saved coreset is reused only when
# all of them agree.
SELECTION_KEYS = ("source", "coreset_size", "seed", "model_seed", "dataset", "text_identity", "image_size", "num_train_pairs",
                  "image_norm")
MODEL_KEYS = ("image_encoder", "image_pretrained", "image_weights", "train_stages", "image_projection")
EXPERT_KEYS = MODEL_KEYS + ("buffer_path", "expert_number", "expert_epoch")
METHOD_KEYS = {"random": (), "herding": EXPERT_KEYS, "kcenter": EXPERT_KEYS, "kmeans": EXPERT_KEYS,
               "centroids": MODEL_KEYS + ("feature_views",),
               "forgetting": MODEL_KEYS + ("forgetting_epochs", "forgetting_batch", "forgetting_lr_img", "forgetting_lr_txt",
                                           "feature_views")}
# Methods that rank training pairs by features: an expert's joint embedding, or the frozen trunk's outputs.
FEATURE_METHODS = ("herding", "kcenter", "kmeans", "centroids")
# What a forgetting-counts file holds.
FORGETTING_ENTRIES = {"key", "events", "ever_learned"}


def needs_train_outputs(method: str) -> bool:
    """Whether selecting by `method` reads the training images' trunk outputs (when the model has a trunk)."""
    return method in ("forgetting", *FEATURE_METHODS)


def coreset_path(settings: EvaluateSettings) -> Path:
    if settings.coreset.coreset_file:
        return Path(settings.coreset.coreset_file)
    return Path("runs") / settings.data.dataset / "coresets" / f"{settings.target.coreset}_{settings.judging.coreset_size}_seed{settings.runtime.seed}.pt"


def forgetting_path(settings: EvaluateSettings) -> Path:
    return coreset_path(settings).parent / f"forgetting_counts_seed{settings.runtime.seed}.pt"


def check_saved_files(coreset_file: Path | None, forgetting: Path | None) -> None:
    """An existing coreset file or forgetting-counts file is replaced only when evaluate.py wrote it."""
    if coreset_file is not None and coreset_file.exists():
        source = set_source(coreset_file)
        if coreset_method(source) is None:
            made = f"a set made by {source}" if source else "not a set file"
            raise UserError(f"--coreset_file {coreset_file} exists and is not a coreset written by evaluate.py "
                            f"({made}); it is never replaced: give --coreset_file another path")
    if forgetting is not None and forgetting.exists():
        try:
            saved = safe_torch_load(forgetting, "forgetting counts", mmap=True)
        except UserError:
            saved = None
        if not (isinstance(saved, dict) and FORGETTING_ENTRIES <= saved.keys()):
            raise UserError(f"{forgetting} (the forgetting counts kept beside --coreset_file) exists and is not "
                            f"written by evaluate.py; it is never replaced: move it or give --coreset_file "
                            f"another folder")


def selection_config(settings: EvaluateSettings, data: RetrievalData) -> dict:
    config = settings.flat_config()
    config.update(source=coreset_source(settings.target.coreset), text_identity=data.text_identity,
                  num_train_pairs=len(data.train.captions), image_norm=image_norm(settings.model))
    if settings.target.coreset != "random":  # the model that counts forgetting events or embeds the pairs
        derive = forgetting_seed if settings.target.coreset == "forgetting" else coreset_probe_seed
        config["model_seed"] = derive(settings.runtime.seed)
    return config


def saved_forgetting_counts(path: Path, key: dict, num_pairs: int) -> coresets.ForgettingCounter | None:
    """The counts kept in `path` when they were counted with `key` and are whole; None to count again."""
    if not path.exists():
        return None
    saved = safe_torch_load(path, "forgetting counts")
    if not (isinstance(saved, dict) and saved.get("key") == key):
        return None
    events, learned = saved.get("events"), saved.get("ever_learned")
    if (isinstance(events, torch.Tensor) and isinstance(learned, torch.Tensor) and events.shape == (num_pairs,)
            and learned.shape == (num_pairs,) and not events.is_floating_point() and int(events.min()) >= 0
            and learned.dtype == torch.bool):
        print(f"reusing the forgetting counts in {path}")
        return coresets.ForgettingCounter.from_counts(events, learned)
    print(f"note: the forgetting counts in {path} are damaged (not {num_pairs} whole counts and flags); "
          f"counting again")
    return None


def forgetting_counts(settings: EvaluateSettings, inputs: ModelInputs, model, device: torch.device,
                      config: dict) -> coresets.ForgettingCounter:
    """Forgetting events of an expert trained for the purpose; cached beside the coreset file, since
    coresets of every size (and their re-runs) can share one count."""
    path = forgetting_path(settings)
    key = {k: config.get(k) for k in FORGETTING_KEYS + ("image_norm", "train_stages", "image_projection",
                                                         "feature_views")}
    num_pairs = len(inputs.data.train.captions)
    counter = saved_forgetting_counts(path, key, num_pairs)
    if counter is not None:
        return counter
    batch_note("--forgetting_batch", settings.coreset.forgetting_batch, num_pairs, "the training split")
    loader = inputs.train_batches(settings.coreset.forgetting_batch, config["model_seed"])
    counter = coresets.count_forgetting(settings.coreset.forgetting_lr_img, settings.coreset.forgetting_lr_txt,
                                        inputs.data, model, device, settings.coreset.forgetting_epochs, loader,
                                        settings.runtime.progress)
    atomic_torch_save({"key": key, "events": counter.events, "ever_learned": counter.ever_learned}, path)
    return counter


@dataclass(frozen=True)
class Expert:
    """The buffer expert whose joint embedding ranks the pairs when the image encoder trains whole:
    expert `number` at snapshot `epoch` (None: the lowest expert, its last snapshot)."""

    directory: Path
    meta: dict
    number: int | None = None
    epoch: int | None = None


def located_expert(settings: EvaluateSettings, data: RetrievalData) -> Expert:
    """evaluate.py's --buffer_path expert, checked against this run's data and model."""
    directory = locate_buffer(settings.coreset.buffer_path, settings.data.dataset, settings.model.image_encoder,
                              settings.model.text_encoder)
    meta = read_metadata(directory)
    # (buffers written before train_pairs existed do not record it)
    train_pairs = len(data.train.captions) if meta and "train_pairs" in meta else None
    check_buffer_matches(meta, directory, expected_metadata(settings.data, settings.model, data.text_identity,
                                                            data.text_dim, train_pairs))
    return Expert(directory, meta, settings.coreset.expert_number, settings.coreset.expert_epoch)


def selection_features(data_settings: DataSettings, model_settings: ModelSettings, inputs: ModelInputs,
                       device: torch.device, expert: Expert | None, probe=None,
                       progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The features the training pairs are ranked by, and what made them (entries of the coreset's config):
    with a frozen trunk (`inputs` hold its outputs) those outputs beside the raw text embeddings, else the
    joint embedding of `expert`, whose weights are loaded into `probe` (default: a fresh model)."""
    data = inputs.data
    if inputs.cached:  # a frozen trunk: no expert needed
        return (coresets.frozen_pair_features(inputs.train_outputs[0], data),
                {"features": "frozen trunk outputs + text-encoder embeddings"})
    if expert is None:
        raise ValueError("an encoder that trains whole needs an expert to embed the pairs")
    if probe is None:
        probe = build_model(model_settings, data.text_dim).to(device)
    features, (number, epoch) = coresets.expert_pair_features(probe, expert.directory, expert.meta, data, data_settings,
                                                              model_settings, device, expert.number, expert.epoch,
                                                              progress)
    return features, {"expert_used": {"directory": str(expert.directory.resolve()), "number": number, "epoch": epoch}}


def kmeans_coreset(count: int, seed: int, data_settings: DataSettings, model_settings: ModelSettings,
                   inputs: ModelInputs, device: torch.device, expert: Expert | None, probe=None,
                   progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The k-means coreset: `count` distinct training pairs, the one nearest each centroid of `selection_features`
    (k-means seeded by `seed`), and what made the features."""
    features, used = selection_features(data_settings, model_settings, inputs, device, expert, probe, progress)
    return coresets.select_kmeans(features, count, seed), used


def select_coreset(settings: EvaluateSettings, inputs: ModelInputs, device: torch.device,
                   config: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the chosen training pairs (captions), and for `centroids` the cluster of every pair;
    fills what was used into `config`."""
    data, method, size = inputs.data, settings.target.coreset, settings.judging.coreset_size
    # One random stream per method, so that e.g. forgetting's tie-breaks are not the random coreset.
    generator = torch.Generator().manual_seed(settings.runtime.seed + (*coresets.METHODS, CENTROIDS).index(method))
    num_pairs = len(data.train.captions)
    if method == "random":
        return coresets.select_random(num_pairs, size, generator), None
    seed_everything(config["model_seed"])
    model = build_model(settings.model, data.text_dim).to(device)
    if method == "forgetting":
        counter = forgetting_counts(settings, inputs, model, device, config)
        config["forgetting"] = {"pairs_with_events": int((counter.events > 0).sum()),
                                "never_learned": int((~counter.ever_learned).sum())}
        return coresets.select_most_forgotten(counter.events, counter.ever_learned, size, generator), None
    if method == CENTROIDS and not inputs.cached:
        raise UserError("--coreset centroids is a set of features, which only a frozen trunk can train on: use "
                        "--train_stages K or --image_projection True")
    expert = None if inputs.cached else located_expert(settings, data)
    common = (settings.data, settings.model, inputs, device, expert, model, settings.runtime.progress)
    if method == "kmeans":
        chosen, used = kmeans_coreset(size, settings.runtime.seed, *common)
        config.update(used)
        return chosen, None
    features, used = selection_features(*common)
    config.update(used)
    if method == "herding":
        return coresets.select_herding(features, size), None
    if method == CENTROIDS:  # the pairs nearest to the centroids are recorded with the set
        centroids, assignments = coresets.kmeans_clusters(features, size, settings.runtime.seed)
        return coresets.nearest_distinct(features, centroids), assignments
    first = int(torch.randint(num_pairs, (1,), generator=generator))
    return coresets.select_kcenter(features, size, first), None


def coreset_set(settings: EvaluateSettings, inputs: ModelInputs, model, device: torch.device) -> tuple[dict, Path]:
    """The coreset as a set payload: reused from --coreset_file when it was made the same way."""
    data = inputs.data
    coresets.check_count(settings.judging.coreset_size, len(data.train.captions))
    path = coreset_path(settings)
    config = selection_config(settings, data)
    if path.exists():
        saved = load_distilled_set(path)
        if all(saved["config"].get(k) == config.get(k) for k in SELECTION_KEYS + METHOD_KEYS[settings.target.coreset]):
            print(f"reusing the {settings.target.coreset} coreset in {path}")
            return saved, path
        print(f"{path} was selected with other settings; selecting again")
    started = time.time()
    indices, assignments = select_coreset(settings, inputs, device, config)
    config["selection_seconds"] = round(time.time() - started, 1)
    lr_img = lr_txt = settings.judging.lr_eval or DEFAULT_REAL_LR
    if assignments is not None:  # the feature-centroid set: mean trunk output and text embedding per cluster
        txt2img = torch.tensor(data.train.txt2img, dtype=torch.long)
        outputs = inputs.train_outputs[0][txt2img]
        image_features, texts = coresets.centroid_pairs(outputs.flatten(1), data.train_text, assignments,
                                                        settings.judging.coreset_size)
        config["trunk"] = set_files.set_trunk_key(settings.model, model, device)
        save_distilled_set(path, None, texts, lr_img, lr_txt, 0, config, caption_indices=indices,
                           image_features=image_features.view(len(texts), *outputs.shape[1:]))
    else:
        chosen = coresets.coreset_pairs(data, indices, settings.model.image_size, image_norm(settings.model))
        save_distilled_set(path, chosen.images, chosen.texts, lr_img, lr_txt, 0, config,
                           caption_indices=chosen.caption_indices)
    print(f"selected {settings.judging.coreset_size} pairs by {settings.target.coreset} in {config['selection_seconds']:.0f}s -> {path}")
    return load_distilled_set(path), path
