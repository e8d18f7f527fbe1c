"""First-token against mean pooling of the packaged sentence encoders, on one annotation file.

For the captions of the first --images images, each caption's nearest other caption (cosine) is looked up; the
score is how often it belongs to the same image. The README's note on why mpnet keeps the project's
first-token rule comes from this:

    python -m bench.bench_text_pooling --ann ../shared/data/flickr8k/annotations/flickr8k_val.json
    python -m bench.bench_text_pooling --ann ~/.cache/vl-distill/shapes/annotations/shapes_val.json --images 100
"""
from __future__ import annotations

import argparse
import json

import torch

from networks.text_encoders import FrozenTextEncoder
from settings.data import default_cache_dir


def same_image_rate(embeddings: torch.Tensor, owners: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return (owners[similarity.argmax(dim=1)] == owners).float().mean().item()


@torch.no_grad()
def poolings(encoder: FrozenTextEncoder, captions: list[str]) -> dict[str, torch.Tensor]:
    tokens = encoder.tokenizer(captions, padding="longest", truncation=True, return_tensors="pt")
    hidden = encoder.model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return {"first token": hidden[:, 0], "mean": (hidden * mask).sum(1) / mask.sum(1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="an annotation file (Karpathy layout: image, caption list)")
    parser.add_argument("--images", type=int, default=200, help="how many images' captions (default 200)")
    parser.add_argument("--cache_dir", default=None, help="where mpnet is assembled (default: the project's cache)")
    args = parser.parse_args(argv)
    entries = json.load(open(args.ann))[:args.images]
    captions = [c for entry in entries for c in entry["caption"]]
    owners = torch.tensor([i for i, entry in enumerate(entries) for _ in entry["caption"]])
    print(f"{len(captions)} captions of {len(entries)} images from {args.ann}")
    for name in ("minilm", "mpnet"):
        encoder = FrozenTextEncoder(name, None, torch.device("cpu"), args.cache_dir or default_cache_dir())
        rates = {pool: same_image_rate(e, owners) for pool, e in poolings(encoder, captions).items()}
        print(f"{name}: " + ", ".join(f"{pool} {100 * rate:.0f}%" for pool, rate in rates.items()))


if __name__ == "__main__":
    main()
