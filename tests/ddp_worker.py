"""Run under torchrun: a few DDP steps on a tiny cache, then each rank saves its weights."""

import sys
from pathlib import Path

import torch

from brainseg.config import ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig
from brainseg.io.datasets import read_split
from brainseg.training.cache import load_cache
from brainseg.training.trainer import Trainer

cache_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = ExperimentConfig(
    preprocess=PreprocessConfig(input_size=32),
    model=ModelConfig(name=sys.argv[3], features=(4, 8, 16), deep_supervision=True),
    train=TrainConfig(batch_size=2, max_steps=3, epochs=1, samples_per_epoch=8, num_threads=1),
)
trainer = Trainer(cfg, load_cache(cache_dir), read_split(cache_dir / "split.json"), out, progress=False)
trainer.fit()
torch.save(trainer.model.state_dict(), out / f"rank{trainer.rank}.pt")
