"""The names a setting may take, in one place: the packages that implement them register under these
names (networks/, data/, matching/, evaluation/) and check at import time that they cover exactly these."""

DATASETS = ("flickr", "coco", "flickr8k", "shapes", "webdata")  # webdata: shards unpacked by export.py shards
IMAGE_ENCODERS = ("nfnet", "nf_resnet50", "nf_regnet", "vit", "resnet18", "efficientnet_lite0", "efficientnet_lite1",
                  "efficientnet_lite2", "convnet", "convnet_w64", "convnet_w32")
NORMALIZATIONS = ("clip", "imagenet", "inception")
IMAGE_NORMS = ("auto", *NORMALIZATIONS)
TEXT_ENCODERS = ("bert", "minilm", "mpnet")
LORA_ENCODERS = ("vit",)
LOSS_TYPES = ("infonce", "wbce", "bce", "kl", "mse")
SIM_TYPES = ("none", "full", "lowrank")
MATCHING_MODES = ("unroll", "exact_lowmem", "tesla")
ENCODER_SCHEDULES = ("cycle", "mean")  # distill.py --extra_image_encoders: one encoder per update, or all of them
PIX_INITS = ("real", "clean", "kmeans", "noise")
TXT_INITS = ("real", "noise")
RANDOM = "random"  # the coreset of pairs drawn at random: the worth-N ladder's rungs
CORESET_METHODS = (RANDOM, "herding", "kcenter", "forgetting", "kmeans")
CENTROIDS = "centroids"
SPLITS = ("val", "test")
WANDB_MODES = ("online", "offline", "disabled")
# reduce.py's selection methods (reduction/select.py); a combination joins them with "+", e.g. semdedup+balanced
REDUCE_METHODS = ("random", "alignment", "prototype_hard", "prototype_easy", "semdedup", "balanced", "density")
BUFFER_FORMATS = ("pt", "safetensors")  # the layouts of an expert buffer (experts/files.py)


def check_registry(kind: str, names, registered) -> None:
    """Fail at import time when an implementation's registry and the settings' names drift apart."""
    if tuple(names) != tuple(registered):
        raise RuntimeError(f"{kind}: settings/choices.py lists {tuple(names)}, the implementation registers "
                           f"{tuple(registered)}")
