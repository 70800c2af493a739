"""Continued pretraining: the job config (`config.py`), Grain data (`data.py`) and the Optax/Orbax loop (`loop.py`)."""

from indexcache_jax.train.config import (CheckpointConfig, DataConfig, LogConfig, OptimConfig, TrainConfig,
                                         apply_overrides, load_train_config)
from indexcache_jax.train.loop import TrainingError, TrainResult, make_optimizer, param_labels, train

__all__ = ["CheckpointConfig", "DataConfig", "LogConfig", "OptimConfig", "TrainConfig", "TrainResult",
           "TrainingError", "apply_overrides", "load_train_config", "make_optimizer", "param_labels", "train"]
