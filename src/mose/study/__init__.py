"""`mose study`: the paper's experiments as configs, run over seeds, summarised as mean ± spread.

A layer over `mose.train` and `mose.eval` (the library never imports it). A
study config names a benchmark (the procedural world, generated, or a
benchmark's converted files), a model (a tiny one is first pretrained on the
world's general questions), one fine-tuning budget every method shares, the
seeds, and its experiments: the main comparison, training-data size,
skill-data size and expert diversity. It writes OUT/results.json and
OUT/report.html.

    from mose.study import load_study, run_study
    run_study(load_study("configs/study/driving.yaml", ["seeds=[0]"]))
"""

from mose.study.config import StudyConfig, StudyError, load_study, study_from_dict
from mose.study.run import StudyResults, run_study

__all__ = ["StudyConfig", "StudyError", "StudyResults", "load_study", "run_study", "study_from_dict"]
