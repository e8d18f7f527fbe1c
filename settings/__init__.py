"""Typed settings: one dataclass per concern, each field one flag and one TOML key (settings/base.py).

    data        DataSettings       which data set, where, loaders and caches         every program
    model       ModelSettings      image encoder, trainable part, text encoder, loss every program
    runtime     RuntimeSettings    seed, device, wandb, progress bars                every program
    protocol    ProtocolSettings   how fresh evaluation models train                 distill.py, evaluate.py
    experts     ExpertSettings     how experts train                                 buffer.py
    distill     DistillSettings    trajectory matching                               distill.py
    judging     JudgingSettings    what evaluate.py reports and how it chooses       evaluate.py
    coreset     CoresetSettings    how evaluate.py selects real coresets             evaluate.py
    reduction   ReductionSettings  which real pairs reduce.py keeps                  reduce.py
"""
from settings.base import Settings, flatten, setting
from settings.data import DataSettings, default_cache_dir
from settings.distillation import DistillSettings
from settings.experts import ExpertSettings
from settings.judging import DEFAULT_REAL_LR, CoresetSettings, JudgingSettings
from settings.model import ModelSettings
from settings.protocol import ProtocolSettings
from settings.runtime import RuntimeSettings

__all__ = ["Settings", "setting", "flatten", "DataSettings", "ModelSettings", "RuntimeSettings", "ProtocolSettings",
           "ExpertSettings", "DistillSettings", "JudgingSettings", "CoresetSettings", "DEFAULT_REAL_LR",
           "default_cache_dir"]
