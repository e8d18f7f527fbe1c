"""reduce.py over webdataset shards: features into a store (one part per shard, over torchrun ranks, resumable),
the pair features the methods read, and the kept keys per shard.

The store's rows are raw frozen features (the image trunk's pooled output, the text encoder's embedding), what any
later choice of space starts from. The pair features are built from them chunk by chunk into memory-mapped arrays
beside the store (`pairs-<digest>/`, named after the space: raw or an expert's heads), so that no step holds more
than a chunk of rows in memory besides what the methods keep.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from data.captions import clean_caption
from data.feature_cache import trunk_key
from data.transforms import test_transform
from experts.files import load_expert_weights, locate_buffer, read_metadata
from networks import image_norm
from networks.text_encoders import FrozenTextEncoder, text_encoder_identity
from evaluation.coresets import pooled_trunk_outputs
from reduction.extract import extract_features
from reduction.feature_store import FeatureStore
from reduction.keep import choose
from reduction.pairs import CHUNK, frozen_model, side_by_side
from reduction.report import summary, write_report
from reduction.select import PairFeatures
from reduction.shards import write_kept_keys, write_shards
from utils import distributed
from utils.cli import UserError
from utils.device import pick_device

# What an expert's metadata must share with the run for its heads to read the store's features (the data set may
# differ: heads trained on Flickr read the same encoders' features of any images and captions).
ENCODER_KEYS = ("image_encoder", "text_model", "image_size", "image_norm", "trainable_parts", "image_pretrained")


def digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_folder(settings, identity: dict, shards: list[str]) -> Path:
    """--features_dir, else a folder in the cache named after the encoders and the shards' folders."""
    if settings.reduction.features_dir:
        return Path(settings.reduction.features_dir)
    folders = sorted({str(Path(shard).resolve().parent) for shard in shards})
    return Path(settings.data.cache_dir) / "reduce_features" / digest({"identity": identity, "folders": folders})


class Encoders:
    """The frozen image trunk (test transform, pooled output) and text encoder as the extraction calls them."""

    def __init__(self, settings, device: torch.device):
        model_settings = settings.model
        self.device = device
        self.text = FrozenTextEncoder(model_settings.text_encoder, model_settings.text_model, device,
                                      settings.data.cache_dir)
        self.model = frozen_model(model_settings, self.text.dim).to(device)
        self.transform = test_transform(model_settings.image_size, image_norm(model_settings))
        with torch.no_grad():  # the shape of one trunk output (a feature map when part of the encoder trains)
            probe = torch.zeros(1, 3, model_settings.image_size, model_settings.image_size, device=device)
            self.output_shape = list(self.model.trunk.eval()(probe).shape[1:])
        self.identity = {**trunk_key(model_settings.image_encoder, self.model.trunk, self.model.train_stages,
                                     model_settings.image_size, image_norm(model_settings)),
                         "text": text_encoder_identity(model_settings.text_encoder, model_settings.text_model),
                         "trunk_output_shape": self.output_shape}

    @torch.no_grad()
    def images(self, images) -> np.ndarray:
        """The trunk's outputs, one flattened row per image (the store keeps them whole: an expert's image head
        reads a feature map as it is; without one they are average-pooled)."""
        batch = torch.stack([self.transform(image) for image in images]).to(self.device)
        return self.model.trunk(batch).flatten(1).float().cpu().numpy()

    def texts(self, captions: list[str]) -> np.ndarray:
        return self.text.encode([clean_caption(c) for c in captions], progress=False).numpy()


def expert_heads(model, settings, text_identity: str) -> dict:
    """Copy the --buffer_path expert's heads into `model`, after checking it was trained on these encoders."""
    model_settings = settings.model
    directory = locate_buffer(settings.reduction.buffer_path, settings.data.dataset, model_settings.image_encoder,
                              model_settings.text_encoder)
    meta = read_metadata(directory)
    if meta is None:
        raise UserError(f"--buffer_path {settings.reduction.buffer_path}: no experts found in {directory}")
    asked = {"image_encoder": model_settings.image_encoder, "text_model": text_identity,
             "image_size": model_settings.image_size, "image_norm": image_norm(model_settings)}
    differ = [f"{key} {meta.get(key)!r} (this run: {value!r})" for key, value in asked.items()
              if key in meta and meta[key] != value]
    if differ:
        raise UserError(f"the experts in {directory} were trained with other encoders than this run's features: "
                        f"{'; '.join(differ)}; give experts of the same image and text encoders")
    number, epoch = load_expert_weights(model, directory, meta, settings.reduction.expert_number)
    return {"directory": str(directory.resolve()), "number": number, "epoch": epoch}


@torch.no_grad()
def pair_features(view, folder: Path, model, shape: list[int], device: torch.device, expert: dict | None,
                  progress: bool) -> PairFeatures:
    """Memory-mapped pair features of every row of the store, built chunk by chunk (and reused while the store's
    index and the space are unchanged)."""
    rows = len(view)
    target = folder / f"pairs-{digest({'index': view.index, 'expert': expert})}"
    names = ("embedding", "cluster", "alignment")
    if not all((target / f"{name}.npy").is_file() for name in names):
        target.mkdir(parents=True, exist_ok=True)
        temporary = {}
        for i, chunk in enumerate(range(0, rows, CHUNK)):
            stop = min(chunk + CHUNK, rows)
            image = torch.from_numpy(np.ascontiguousarray(view.image[chunk:stop])).reshape(-1, *shape)
            text = torch.from_numpy(np.ascontiguousarray(view.text[chunk:stop]))
            if expert is not None:
                image = F.normalize(model.encode_trunk_output(image.to(device)).float(), dim=1).cpu()
                text = F.normalize(model.text_projection(text.to(device)).float(), dim=1).cpu()
            else:
                image = pooled_trunk_outputs(image)
            image, text = F.normalize(image.float(), dim=1), F.normalize(text.float(), dim=1)
            joint = side_by_side(image, text)
            if i == 0:
                for name, width in (("embedding", joint.shape[1]), ("cluster", image.shape[1]), ("alignment", None)):
                    shape = (rows, width) if width else (rows,)
                    temporary[name] = target / f".{name}.partial.npy"
                    np.lib.format.open_memmap(temporary[name], mode="w+", dtype=np.float32, shape=shape).flush()
            # (without an expert the image and text spaces differ: no alignment, the file holds zeros)
            agreement = (image * text).sum(dim=1) if expert is not None else torch.zeros(len(image))
            for name, values in (("embedding", joint), ("cluster", image), ("alignment", agreement)):
                array = np.load(temporary[name], mmap_mode="r+")
                array[chunk:stop] = values.numpy()
                array.flush()
                del array
        for name in names:  # complete: only now under the names a later run reuses
            temporary[name].replace(target / f"{name}.npy")
    loaded = {name: np.load(target / f"{name}.npy", mmap_mode="r") for name in names}
    return PairFeatures(embedding=loaded["embedding"], alignment=loaded["alignment"] if expert is not None else None,
                        image_of_pair=np.arange(rows, dtype=np.int64), cluster_features=loaded["cluster"])


def reduce_shards(settings, shards: list[str], started: float) -> int:
    """reduce.py --shards: extract the features of `shards` (every rank), then choose and write (rank 0)."""
    reduction = settings.reduction
    device = pick_device(settings.runtime.device)
    group = distributed.init_from_env(device)
    try:
        encoders = Encoders(settings, device)
        store = FeatureStore(store_folder(settings, encoders.identity, shards), encoders.identity)
        extracted = extract_features(shards, store, encoders.images, encoders.texts,
                                     batch_size=settings.data.batch_size_test, rank=group.rank,
                                     world_size=group.world_size, skip_bad=settings.data.skip_bad_images,
                                     progress=settings.runtime.progress)
        if not group.is_main:
            return 0
        view = store.open()
        expert = expert_heads(encoders.model, settings, encoders.identity["text"]) if reduction.buffer_path else None
        features = pair_features(view, store.folder, encoders.model, encoders.output_shape, device, expert,
                                 settings.runtime.progress)
    finally:
        distributed.shutdown()
    total = len(view)
    skipped = view.index.get("skipped") or {}
    print(f"choosing {reduction.keep:g} of {total:,} pairs in {len(shards)} shards by {reduction.method}"
          + (f" ({sum(skipped.values())} samples skipped: {skipped})" if skipped else ""))
    chosen = choose(reduction, features, settings.runtime.seed, settings.runtime.progress)
    shard_of = {part["name"]: part["shard"] for part in view.parts}
    kept: dict[str, list[str]] = {shard: [] for shard in shards}
    for index in chosen.kept:
        part, key = view.keys[int(index)]
        kept[shard_of[part]].append(key)
    out = Path(reduction.out)
    write_kept_keys(kept, out)
    info = {"source": reduction.shards, "shards": len(shards), "pairs": total, "skipped": skipped,
            "features": str(store.folder), "expert": expert, "written_parts": extracted.parts_written,
            "space": "an expert's trained image and text heads" if expert else "frozen encoders (no expert)",
            "command": ["reduce.py", *sys.argv[1:]]}
    report = summary(chosen, total, reduction.keep, reduction.method, info)
    report["seconds"] = round(time.time() - started, 1)
    paths = write_report(report, chosen, out) if reduction.report else ()
    written = write_shards(shards, kept, Path(reduction.write_shards), progress=settings.runtime.progress) \
        if reduction.write_shards else []
    print(f"kept {len(chosen.kept):,} of {total:,} pairs: wrote {out}" + (f", {len(written)} shards in "
                                                                          f"{reduction.write_shards}" if written else "")
          + (f" and {', '.join(str(p) for p in paths)}" if paths else ""))
    return 0
