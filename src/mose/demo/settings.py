"""How big the demo is: data sizes and the one optimizer budget every method gets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mose.study import StudyConfig, study_from_dict

DEMO_METHODS = ("mose", "moe_4x1", "dense_sft")


@dataclass(frozen=True)
class DemoSettings:
    pretrain_samples: int  # general questions about driving scenes (the world's `--general` kinds)
    pretrain_steps: int
    train_samples: int  # question-answer records every method fine-tunes on
    labelled: int  # of those, rule-annotated for the router stage (the paper: about 2,000)
    test_samples: int
    steps: int  # fine-tuning steps, the same for every method
    batch_size: int = 16
    lr: float = 1e-3  # fine-tuning lr, the same for every method (never tuned for one of them)
    pretrain_lr: float = 2e-3
    max_new_tokens: int = 16  # the longest answer ("slow down and yield") is 6 tokens
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def study(self, out: Path) -> StudyConfig:
        """The demo as a study: one seed, MoSE against its two baselines, on the driving world."""
        batch = {"batch_size": self.batch_size}
        return study_from_dict({
            "name": "mose demo: MoSE vs token MoE vs dense SFT", "output_dir": str(out),
            "model": "tiny:qwen2_vl",
            "world": {"domain": "driving", "pretrain_samples": self.pretrain_samples,
                      "train_samples": self.train_samples, "test_samples": self.test_samples,
                      "seed": self.seed},
            "pretrain": {"max_steps": self.pretrain_steps, "lr": self.pretrain_lr, "save_every": 50,
                         **batch},
            "finetune": {"max_steps": self.steps, "lr": self.lr, "save_every": 50, **batch},
            # The router stage's own defaults: fitted to convergence on its held-out split.
            "router": {"labelled": self.labelled},
            "generation": {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size},
            "seeds": [self.seed],
            "experiments": {"main": {"methods": list(DEMO_METHODS)},
                            "diversity": {"methods": ["mose", "moe_4x1"]}},
        }, source="mose demo")


# Calibrated on a 2-core CPU (README, "The demo", lists the runs). The lr was chosen on dense SFT
# and is shared by every method.
DEFAULT = DemoSettings(pretrain_samples=6000, pretrain_steps=600, train_samples=6000, labelled=1000,
                       test_samples=400, steps=500)
# --quick checks the pipeline; its scores mean little.
QUICK = replace(DEFAULT, pretrain_samples=400, pretrain_steps=100, train_samples=400, labelled=160,
                test_samples=96, steps=60)
