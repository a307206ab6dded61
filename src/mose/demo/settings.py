"""How big the demo is: data sizes and the one optimizer budget every method gets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class DemoSettings:
    pretrain_samples: int  # "Describe the scene." records of the pretraining stage
    pretrain_steps: int
    train_samples: int  # question-answer records every method fine-tunes on
    labelled: int  # of those, rule-annotated for the router stage (the paper: about 2,000)
    test_samples: int
    steps: int  # fine-tuning steps, the same for every method
    router_steps: int  # MoSE's router pretraining (routers only, no backward through the model)
    batch_size: int = 16
    lr: float = 1e-3  # fine-tuning lr, the same for every method (never tuned for one of them)
    pretrain_lr: float = 2e-3
    router_lr: float = 1e-2
    max_new_tokens: int = 16  # the longest answer ("slow down and yield") is 6 tokens
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Calibrated on a 2-core CPU (about 8 minutes; README, "The demo", lists the runs). The lr was
# chosen on dense SFT and is shared by every method.
DEFAULT = DemoSettings(pretrain_samples=6000, pretrain_steps=1200, train_samples=6000, labelled=1000,
                       test_samples=400, steps=800, router_steps=100)
# --quick checks the pipeline; its scores mean little.
QUICK = replace(DEFAULT, pretrain_samples=400, pretrain_steps=100, train_samples=400, labelled=160,
                test_samples=96, steps=60, router_steps=10)
