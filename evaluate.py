"""Judge a distilled set, a coreset of real pairs, or full-data training with the evaluation protocol.

Exactly one of:
  --distilled PATH        a saved distilled set (or a saved coreset: the same file format). Data set,
                          encoders, image size and evaluation settings come from the file unless
                          given on the command line; the learning rates are the learned step sizes:
                          the image side trains at syn_lr_img, the text head at syn_lr_txt.
  --coreset METHOD        choose --coreset_size real training pairs (random, herding, kcenter,
                          forgetting, kmeans), save them as a set file, and evaluate them the same way;
                          `centroids` (frozen trunk only) is the k-means feature-centroid set instead:
                          per cluster the mean trunk output and the mean text embedding of its pairs.
  --full                  train on the whole training split (the upper bound), same protocol.
--num_eval fresh models (seeds --seed, --seed+1, ...) train --epoch_eval_train epochs (SGD, momentum
0.9, weight decay 5e-4, lr x0.1 half way); the table shows mean ± std over them. --lr_eval LR trains both
the image side and the text head at LR (coresets and --full: at 0.1 by default). With --lr_grid one
learning rate for both is chosen first on --eval_split (val: the split for choices) by --tune_models models per
value; --epoch_scales 0.5 1 2 chooses the number of epochs jointly (multiples of --epoch_eval_train), and
--widen_grid K scores up to K more cells one step past the grid's edge where the best sits on one (the JSON's
"at_edge" says where it still does). The reported numbers are on --report_split (auto: the test split when its annotation file is
present, e.g. flickr8k_test.json beside the others, else --eval_split; the output says which).
--eval_image_encoder (or --image_encoder) trains another image encoder than the set was made with
(cross-architecture transfer); the label, the printed lines and the JSON name the encoder used. Another
--dataset or text encoder than the set's is refused: its text embeddings mean nothing elsewhere.
--out writes every metric, its runs, the choices and the full configuration as JSON; it (and
--coreset_file) are checked for writability before any work.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)
import torch

from data.build import has_split, load_retrieval_data
from data.distilled_set import learned_lr_problem, load_distilled_set, save_distilled_set, set_source
from data.feature_cache import trunk_key
from data.model_inputs import inputs_for
from data.transforms import renormalize
from evaluation import coresets
from evaluation.grid import scaled_epochs
from evaluation.metrics import format_table
from evaluation.protocol import judge, lr_label, pair_batches, untrained_warning
from evaluation.training import batch_note
from experts.files import check_buffer_matches, expected_metadata, locate_buffer, read_metadata
from networks import build_model, check_image_size, image_norm
from networks.contrastive import check_pair_count
from networks.text_encoders import text_encoder_identity
from settings import DEFAULT_REAL_LR, programs
from settings.choices import CENTROIDS
from settings.judging import TargetSettings
from settings.programs import EvaluateSettings
from utils.cli import UserError, run_cli
from utils.device import pick_device, seed_everything
from utils.io import atomic_torch_save, atomic_write_json, safe_torch_load
from utils.paths import ensure_output_file, json_object_in, refuse_outputs_over_inputs
from utils.seeds import coreset_probe_seed, forgetting_seed
from utils.wandb_logging import start_run

# Settings a distilled-set file supplies unless the command line gives them.
FILE_SETTINGS = ("dataset", "image_root", "ann_root", "cache_dir", "eval_split", "max_train_images", "text_encoder",
                 "text_model", "image_encoder", "image_size", "image_pretrained", "image_weights", "image_norm",
                 "train_stages", "feature_views", "num_eval", "epoch_eval_train", "batch_train", "dsa", "dsa_strategy",
                 "image_projection", "lora_rank", "loss_type")
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


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations the command line sets itself (so file settings do not override them)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            else:
                kwargs["nargs"] = action.nargs
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed command line and the flags it gives itself (so that a set file's settings do not override them)."""
    parser = programs.build_parser("evaluate", __doc__)
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args(argv), explicit_flags(parser, argv)


def check_settings(settings: EvaluateSettings) -> None:
    """Rules between the groups, after every group passed its own checks."""
    coreset, size = settings.target.coreset, settings.judging.coreset_size
    if coreset and size is None:
        raise UserError("--coreset needs --coreset_size N (how many real pairs to select; --num_queries is the same)")
    if not coreset and size is not None:
        raise UserError("--coreset_size only applies to --coreset (a distilled set has its own size)")
    if settings.judging.eval_image_encoder:  # the encoder that trains
        check_image_size(settings.judging.eval_image_encoder, settings.model.image_size, "eval_image_encoder")
    else:
        check_image_size(settings.model.image_encoder, settings.model.image_size)


def apply_file_settings(namespace: argparse.Namespace, config: dict, explicit: set[str]) -> None:
    """Take data, encoder and protocol settings from a set file where the command line is silent."""
    for key in FILE_SETTINGS:
        if key in config and key not in explicit:
            setattr(namespace, key, config[key])
    if "image_norm" not in config and "image_norm" not in explicit:
        namespace.image_norm = "clip"  # sets written before the setting existed hold CLIP-normalised pixels


def check_set_origin(settings: EvaluateSettings, config: dict, set_path: Path) -> None:
    """Refuse to judge a set on another data set or text encoder than it was made with: its text embeddings
    (and the captions they stand for) only mean something there. Another image encoder is allowed (transfer)."""
    made_on = config.get("dataset")
    if made_on and made_on != settings.data.dataset:
        raise UserError(f"{set_path} was made from --dataset {made_on}, but this run asks for --dataset "
                        f"{settings.data.dataset}; a set is judged on the data set it was distilled from: drop --dataset")
    made_with = config.get("text_identity")
    asked = text_encoder_identity(settings.model.text_encoder, settings.model.text_model)
    if made_with and made_with != asked:
        raise UserError(f"{set_path} holds embeddings of text model {made_with}, but this run would embed the "
                        f"captions with {asked}; embeddings of two text models are not comparable: drop "
                        f"--text_encoder/--text_model or pass the ones the set was made with")


def check_learned_lrs(settings: EvaluateSettings, payload: dict, set_path: Path) -> None:
    """A set's learned step sizes become the evaluation learning rate unless --lr_eval/--lr_grid choose it;
    a diverged distillation leaves them zero, negative or NaN."""
    if settings.judging.lr_eval is not None or settings.judging.lr_grid:
        return
    problem = learned_lr_problem(payload)
    if problem:
        raise UserError(f"distilled set {set_path} {problem} (did the distillation diverge?); pass --lr_eval LR or "
                        f"--lr_grid LR [LR ...] to choose the evaluation learning rate instead")


# The keys by which an existing --out file is recognised as an evaluate.py report (replaced without --overwrite).
REPORT_KEYS = ("label", "metrics", "config")


def forgetting_path(settings: EvaluateSettings) -> Path:
    return coreset_path(settings).parent / f"forgetting_counts_seed{settings.runtime.seed}.pt"


def check_paths(settings: EvaluateSettings) -> None:
    """Before any work: no file this run writes is one it reads, and an existing file it would replace is
    evaluate.py's own kind (a report, a coreset, forgetting counts); --overwrite True lets --out replace another."""
    coreset = settings.target.coreset
    coreset_file = coreset_path(settings) if coreset else None
    forgetting = forgetting_path(settings) if coreset == "forgetting" else None
    experts = settings.coreset.buffer_path if coreset in ("herding", "kcenter", "kmeans") else None
    refuse_outputs_over_inputs({"--out": settings.judging.out, "--coreset_file": coreset_file,
                                "the forgetting counts": forgetting, "--cache_dir": settings.data.cache_dir},
                               {"--distilled": settings.target.distilled, "--buffer_path": experts,
                                **settings.data_paths()})
    out = Path(settings.judging.out) if settings.judging.out else None
    if out is not None and out.is_file() and not settings.judging.overwrite:
        report = json_object_in(out)
        if report is None or not all(key in report for key in REPORT_KEYS):
            raise UserError(f"--out {out} exists and is not an evaluate.py report (a JSON object with "
                            f"{', '.join(REPORT_KEYS)}); give --out another path, or --overwrite True to replace it")
    if coreset_file is not None and coreset_file.exists():
        source = set_source(coreset_file)
        if not (source or "").startswith("coreset:"):
            made = f"a set made by {source}" if source else "not a set file"
            raise UserError(f"--coreset_file {coreset_file} exists and is not a coreset written by evaluate.py "
                            f"({made}); it is never replaced: give --coreset_file another path")
    if forgetting is not None and forgetting.exists():
        try:
            saved = safe_torch_load(forgetting, "forgetting counts", mmap=True)
        except UserError:
            saved = None
        if not (isinstance(saved, dict) and {"key", "events", "ever_learned"} <= saved.keys()):
            raise UserError(f"{forgetting} (the forgetting counts kept beside --coreset_file) exists and is not "
                            f"written by evaluate.py; it is never replaced: move it or give --coreset_file "
                            f"another folder")


def check_outputs(settings: EvaluateSettings) -> None:
    """Every file this run writes can be written, before any work (not after the last model trained)."""
    if settings.judging.out:
        ensure_output_file(settings.judging.out, "--out")
    if settings.target.coreset:  # the forgetting counts are kept beside it
        ensure_output_file(coreset_path(settings), "--coreset_file")


def resolve_report_split(settings: EvaluateSettings) -> str:
    """The split the final numbers are reported on (`--report_split auto`: test when it is there)."""
    if settings.judging.report_split != "auto":
        if settings.judging.report_split != settings.data.eval_split and not has_split(settings.data, settings.judging.report_split):
            raise UserError(f"--report_split {settings.judging.report_split}: its annotation file is not in the annotation folder")
        return settings.judging.report_split
    return "test" if settings.data.eval_split != "test" and has_split(settings.data, "test") else settings.data.eval_split


def coreset_path(settings: EvaluateSettings) -> Path:
    if settings.coreset.coreset_file:
        return Path(settings.coreset.coreset_file)
    return Path("runs") / settings.data.dataset / "coresets" / f"{settings.target.coreset}_{settings.judging.coreset_size}_seed{settings.runtime.seed}.pt"


def selection_config(settings: EvaluateSettings, data) -> dict:
    config = settings.snapshot()
    config.update(source=f"coreset:{settings.target.coreset}", text_identity=data.text_identity,
                  num_train_pairs=len(data.train.captions), image_norm=image_norm(settings.model))
    if settings.target.coreset != "random":  # the model that counts forgetting events or embeds the pairs
        derive = forgetting_seed if settings.target.coreset == "forgetting" else coreset_probe_seed
        config["model_seed"] = derive(settings.runtime.seed)
    return config


def forgetting_counts(settings: EvaluateSettings, inputs, model, device: torch.device, config: dict) -> coresets.ForgettingCounter:
    """Forgetting events of an expert trained for the purpose; cached beside the coreset file, since
    coresets of every size (and their re-runs) can share one count."""
    path = forgetting_path(settings)
    key = {k: config.get(k) for k in FORGETTING_KEYS + ("image_norm", "train_stages", "image_projection",
                                                         "feature_views")}
    if path.exists():
        saved = safe_torch_load(path, "forgetting counts")
        if isinstance(saved, dict) and saved.get("key") == key:
            pairs = len(inputs.data.train.captions)
            events, learned = saved.get("events"), saved.get("ever_learned")
            if (isinstance(events, torch.Tensor) and isinstance(learned, torch.Tensor) and events.shape == (pairs,)
                    and learned.shape == (pairs,) and not events.is_floating_point() and int(events.min()) >= 0
                    and learned.dtype == torch.bool):
                print(f"reusing the forgetting counts in {path}")
                return coresets.ForgettingCounter.from_counts(events, learned)
            print(f"note: the forgetting counts in {path} are damaged (not {pairs} whole counts and flags); "
                  f"counting again")
    batch_note("--forgetting_batch", settings.coreset.forgetting_batch, len(inputs.data.train.captions),
               "the training split")
    loader = inputs.train_batches(settings.coreset.forgetting_batch, config["model_seed"])
    counter = coresets.count_forgetting(settings.coreset.forgetting_lr_img, settings.coreset.forgetting_lr_txt,
                                        inputs.data, model, device, settings.coreset.forgetting_epochs, loader,
                                        settings.runtime.progress)
    atomic_torch_save({"key": key, "events": counter.events, "ever_learned": counter.ever_learned}, path)
    return counter


def expert_pair_features(settings: EvaluateSettings, data, model, device: torch.device, config: dict) -> torch.Tensor:
    """Joint embeddings of the training pairs under a buffer expert (the encoder trains: no frozen features)."""
    directory = locate_buffer(settings.coreset.buffer_path, settings.data.dataset, settings.model.image_encoder, settings.model.text_encoder)
    meta = read_metadata(directory)
    # (buffers written before train_pairs existed do not record it)
    train_pairs = len(data.train.captions) if meta and "train_pairs" in meta else None
    check_buffer_matches(meta, directory, expected_metadata(settings.data, settings.model, data.text_identity,
                                                            data.text_dim, train_pairs))
    features, (number, epoch) = coresets.expert_pair_features(model, directory, meta, data, settings.data,
                                                              settings.model, device,
                                                              settings.coreset.expert_number, settings.coreset.expert_epoch,
                                                              settings.runtime.progress)
    config["expert_used"] = {"directory": str(directory.resolve()), "number": number, "epoch": epoch}
    return features


def select_coreset(settings: EvaluateSettings, inputs, device: torch.device, config: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the chosen training pairs (captions), and for `centroids` the cluster of every pair;
    fills what was used into `config`."""
    data = inputs.data
    # One random stream per method, so that e.g. forgetting's tie-breaks are not the random coreset.
    method_index = (*coresets.METHODS, CENTROIDS).index(settings.target.coreset)
    generator = torch.Generator().manual_seed(settings.runtime.seed + method_index)
    num_pairs = len(data.train.captions)
    if settings.target.coreset == "random":
        return coresets.select_random(num_pairs, settings.judging.coreset_size, generator), None
    seed_everything(config["model_seed"])
    model = build_model(settings.model, data.text_dim).to(device)
    if settings.target.coreset == "forgetting":
        counter = forgetting_counts(settings, inputs, model, device, config)
        config["forgetting"] = {"pairs_with_events": int((counter.events > 0).sum()),
                                "never_learned": int((~counter.ever_learned).sum())}
        return coresets.select_most_forgotten(counter.events, counter.ever_learned, settings.judging.coreset_size, generator), None
    if inputs.cached:  # a frozen trunk: its outputs and the raw text embeddings, no expert needed
        features = coresets.frozen_pair_features(inputs.train_outputs[0], data)
        config["features"] = "frozen trunk outputs + text-encoder embeddings"
    else:
        if settings.target.coreset == CENTROIDS:
            raise UserError("--coreset centroids is a set of features, which only a frozen trunk can train on: use "
                            "--train_stages K or --image_projection True")
        features = expert_pair_features(settings, data, model, device, config)
    if settings.target.coreset == "herding":
        return coresets.select_herding(features, settings.judging.coreset_size), None
    if settings.target.coreset == "kmeans":
        return coresets.select_kmeans(features, settings.judging.coreset_size, settings.runtime.seed), None
    if settings.target.coreset == CENTROIDS:  # the pairs nearest to the centroids are recorded with the set
        centroids, assignments = coresets.kmeans_clusters(features, settings.judging.coreset_size, settings.runtime.seed)
        return coresets.nearest_distinct(features, centroids), assignments
    first = int(torch.randint(num_pairs, (1,), generator=generator))
    return coresets.select_kcenter(features, settings.judging.coreset_size, first), None


def coreset_set(settings: EvaluateSettings, inputs, model, device: torch.device) -> tuple[dict, Path]:
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
        config["trunk"] = inputs_trunk_key(settings, model, device)
        save_distilled_set(path, None, texts, lr_img, lr_txt, 0, config, caption_indices=indices,
                           image_features=image_features.view(len(texts), *outputs.shape[1:]))
    else:
        chosen = coresets.coreset_pairs(data, indices, settings.model.image_size, image_norm(settings.model))
        save_distilled_set(path, chosen.images, chosen.texts, lr_img, lr_txt, 0, config,
                           caption_indices=chosen.caption_indices)
    print(f"selected {settings.judging.coreset_size} pairs by {settings.target.coreset} in {config['selection_seconds']:.0f}s -> {path}")
    return load_distilled_set(path), path


def inputs_trunk_key(settings: EvaluateSettings, model, device: torch.device) -> dict:
    return trunk_key(settings.model.image_encoder, model.trunk.to(device), model.train_stages, settings.model.image_size, image_norm(settings.model))


def evaluation_model_check(settings: EvaluateSettings, model, images: torch.Tensor) -> None:
    """Fail early, with a clear message, when the evaluation encoder cannot take the set's images."""
    if images.shape[-1] != settings.model.image_size or images.shape[-2] != settings.model.image_size:
        raise UserError(f"the set's images are {images.shape[-2]}x{images.shape[-1]} px but --image_size is "
                        f"{settings.model.image_size}; evaluate at the set's size")
    model.eval()
    try:
        with torch.no_grad():
            model.image_encoder(images[:2].float().cpu())
    except RuntimeError as err:
        raise UserError(f"image encoder {settings.model.image_encoder} cannot take the set's {images.shape[-2]}x"
                        f"{images.shape[-1]} px images ({str(err).splitlines()[0]})") from None


def set_inputs(settings: EvaluateSettings, payload: dict, set_path: Path, model, device: torch.device) -> dict:
    """What the evaluation models train on from a set file: pixels in this run's normalisation, or trunk outputs
    (only for the trunk that made them)."""
    if "image_features" in payload:
        if not model.has_trunk or payload["config"].get("trunk") != inputs_trunk_key(settings, model, device):
            raise UserError(f"{set_path} holds trunk outputs (a feature-level set), which only the frozen trunk that "
                            f"made them can train on: evaluate it with the same --image_encoder, --image_size, "
                            f"--image_norm and --train_stages")
        return {"trunk_outputs": payload["image_features"]}
    images = renormalize(payload["image_syn"], payload["config"].get("image_norm", "clip"), image_norm(settings.model))
    evaluation_model_check(settings, model, images)
    return {"images": images}


def main(argv=None) -> int:
    namespace, explicit = parse_args(argv)
    TargetSettings.from_namespace(namespace)  # exactly one thing to judge, before any file is read
    started = time.time()
    payload, set_path = None, None
    if namespace.distilled:
        payload, set_path = load_distilled_set(namespace.distilled), Path(namespace.distilled)
        check_pair_count(len(payload["text_syn"]), f"--distilled {set_path}")
        apply_file_settings(namespace, payload["config"], explicit)
    settings = programs.from_namespace("evaluate", namespace)
    check_paths(settings)
    check_settings(settings)
    if payload is not None:
        check_set_origin(settings, payload["config"], set_path)
        check_learned_lrs(settings, payload, set_path)
    check_outputs(settings)
    device = pick_device(settings.runtime.device)
    report_split = resolve_report_split(settings)
    data = load_retrieval_data(settings.data, settings.model, device, progress=settings.runtime.progress, extra_splits=(report_split,))
    model = inputs = None
    if payload is None and settings.target.coreset:
        model = build_model(settings.model, data.text_dim)
        needs_train = model.has_trunk and settings.target.coreset in ("forgetting", *FEATURE_METHODS)
        inputs = inputs_for(settings.data, settings.model, data, model, device, settings.runtime.progress, need_train=needs_train)
        payload, set_path = coreset_set(settings, inputs, model, device)
    if payload is not None and payload["text_syn"].shape[1] != data.text_dim:
        raise UserError(f"{set_path} holds {payload['text_syn'].shape[1]}-d text embeddings, the text encoder "
                        f"gives {data.text_dim}-d")
    # The encoder the set was made with (a coreset: the one this run selected with); --image_encoder or
    # --eval_image_encoder may train another one.
    made_with = payload["config"].get("image_encoder", settings.model.image_encoder) if payload else None
    if settings.judging.eval_image_encoder and settings.judging.eval_image_encoder != settings.model.image_encoder:
        settings.model.image_encoder = settings.judging.eval_image_encoder
        model = inputs = None
    if model is None:
        model = build_model(settings.model, data.text_dim)
    if inputs is None or (settings.target.full and model.has_trunk and not inputs.cached):
        inputs = inputs_for(settings.data, settings.model, data, model, device, settings.runtime.progress, need_train=settings.target.full and model.has_trunk)
    lr = settings.judging.lr_eval or (payload["syn_lr_img"] if settings.target.distilled else DEFAULT_REAL_LR)
    lrs = settings.judging.lr_grid or [lr]
    # A set's learned step sizes: the image side trains at one, the text head at the other (LoRS and RepBlend
    # evaluate theirs so); --lr_eval and --lr_grid give one rate for both (the protocol's choice).
    learned = settings.target.distilled and settings.judging.lr_eval is None and not settings.judging.lr_grid
    lr_txt = payload["syn_lr_txt"] if learned else None

    if payload is not None:
        pairs = set_inputs(settings, payload, set_path, model, device)
        source = payload["config"].get("source", "distilled")
        what = f"{len(payload['text_syn'])} pairs from {set_path} ({source})"
        make_loader = pair_batches(settings.protocol, model, inputs, device, payload["text_syn"], **pairs)
        label = f"{source}-{len(payload['text_syn'])}"
        label += f" on {settings.model.image_encoder}" if settings.model.image_encoder != made_with else ""
    else:
        what = f"full-data training ({len(data.train.captions)} pairs)"
        make_loader = lambda seed: inputs.train_batches(settings.protocol.batch_train, seed)  # noqa: E731
        label = f"full-{len(data.train.captions)}"
    batch_note("--batch_train", settings.protocol.batch_train,
               len(payload["text_syn"]) if payload is not None else len(data.train.captions),
               "the set" if payload is not None else "the training split")
    judging = settings.judging
    epochs = scaled_epochs(settings.protocol.epoch_eval_train, judging.epoch_scales)
    choice = " and ".join(([f"lr chosen from {lrs}"] if len(lrs) > 1 else [lr_label(lrs[0], lr_txt)]) +
                          ([f"epochs from {epochs}"] if len(epochs) > 1 else []))
    choice += f" on {settings.data.eval_split}" if len(lrs) * len(epochs) > 1 else f", {epochs[0]} epochs"
    choice += f" (widened by up to {judging.widen_grid} cells past an edge)" if judging.widen_grid and \
        len(lrs) * len(epochs) > 1 else ""
    transfer = f" (the set was made with {made_with})" if made_with and made_with != settings.model.image_encoder else ""
    print(f"evaluating {what} with {settings.protocol.num_eval} x {settings.model.image_encoder}{transfer}: {choice}; reporting on {report_split}"
          + (f" (no {settings.data.dataset} test split beside the others: the split used for choices)"
             if settings.judging.report_split == "auto" and report_split == settings.data.eval_split != "test" else ""))
    result = judge(settings.model, settings.protocol, make_loader, lrs, inputs, device, settings.protocol.num_eval,
                   settings.runtime.seed, report_split, judging.tune_models, settings.runtime.progress,
                   similarity=payload.get("similarity") if payload is not None else None, lr_txt=lr_txt,
                   epochs=epochs, widen=judging.widen_grid)
    summary = result["metrics"]
    seconds = time.time() - started
    runtime = settings.runtime
    run = start_run(runtime.logging_mode, runtime.wandb_project, runtime.wandb_entity, runtime.name,
                    settings.snapshot(), "evaluate")
    run.log({**{f"eval/{k}": v["mean"] for k, v in summary.items()},
             **{f"eval/{k}_std": v["std"] for k, v in summary.items()}})
    run.finish()
    print(format_table({f"{label} ({report_split})": summary}))
    print(f"{settings.protocol.num_eval} models at {lr_label(result['lr'], result['lr_txt'])}, {result['epochs']} "
          f"epochs, {seconds:.0f}s")
    if result["at_edge"]:
        print(f"note: the choice sits at the grid's edge in {' and '.join(result['at_edge'])}" +
              (f" after {result['widened']} more cells (--widen_grid {judging.widen_grid})" if judging.widen_grid
               else " (--widen_grid K would try up to K values past it)"))
    models = settings.protocol.num_eval + judging.tune_models * len(result["tuning"])
    warning = untrained_warning(result["untrained_models"], models)
    if warning:
        print(warning)
    if settings.judging.out:
        config = settings.snapshot()
        config.update(set_file=str(set_path) if set_path else None, set_config=payload["config"] if payload else None,
                      set_size=len(payload["text_syn"]) if payload else len(data.train.captions),
                      lr_used=result["lr"], lr_txt_used=result["lr_txt"], epochs_used=result["epochs"], image_encoder_of_set=made_with,
                      text_identity=data.text_identity,
                      image_norm_used=image_norm(settings.model), device=str(device),
                      command=[Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv)
        atomic_write_json({"label": label, "image_encoder": settings.model.image_encoder, "metrics": summary, "split": report_split, "lr": result["lr"],
                           "lr_txt": result["lr_txt"], "epochs": result["epochs"], "tuning": result["tuning"],
                           "widened": result["widened"], "at_edge": result["at_edge"],
                           "selection_split": settings.data.eval_split,
                           "selection_metrics": result["selection_metrics"], "config": config,
                           "untrained_models": result["untrained_models"], "warning": warning,
                           "seconds": round(seconds, 1)}, Path(settings.judging.out))
        print(f"wrote {settings.judging.out}")
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
