"""The runs a study needs, and one run: fine-tune a method, answer the test split, measure.

Experiments share runs: the main comparison's MoSE at the full data and the
default labelled set is also the data-size curve's last point and one row of
the skill-data table, so it trains once. A run that finished left
`result.json` in its folder (written last, atomically) and is not run again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mose.data import read_jsonl
from mose.data.schema import atomic_path
from mose.eval.analysis import expert_similarity
from mose.layers.blocks import expert_blocks
from mose.models.loading import load_model
from mose.study.config import StudyConfig, StudyError
from mose.study.data import StudyData
from mose.study.measure import active_params, evaluate, trainable_params
from mose.study.methods import FINAL_STAGE, METHODS, method_stages
from mose.train import train
from mose.train.data import EncodingCache
from mose.train.recipe import Recipe, RecipeError, recipe_from_dict

RUN_RESULT_FILE = "result.json"


@dataclass(frozen=True)
class RunSpec:
    method: str
    fraction: float  # of the answer data
    labelled: int | None  # skill-labelled samples for the routers (MoSE methods; None: all there are)
    seed: int

    @property
    def name(self) -> str:
        name = f"{self.method}/f{self.fraction:g}"
        if METHODS[self.method].mose:
            name += f"-l{'all' if self.labelled is None else self.labelled}"
        return f"{name}-s{self.seed}"

    @property
    def order(self) -> tuple:
        """Seed, then method in METHODS' order, then data and labels: how runs are run and listed."""
        labelled = -1 if self.labelled is None else self.labelled
        return (self.seed, list(METHODS).index(self.method), self.fraction, labelled)


def default_labelled(config: StudyConfig, method: str) -> int | None:
    """The labelled set a method's routers learn from outside the skill-data experiment."""
    return config.router.get("labelled") if METHODS[method].mose else None


def main_run(config: StudyConfig, method: str, seed: int) -> RunSpec:
    """A method's run on all the data with the default labelled set."""
    return RunSpec(method, 1.0, default_labelled(config, method), seed)


def plan_runs(config: StudyConfig) -> list[RunSpec]:
    """Every run the config's experiments need, each once, in a stable order."""
    experiments = config.experiments
    runs = []
    for seed in config.seeds:
        for group in (experiments.main, experiments.diversity):
            runs += [main_run(config, m, seed) for m in (group.methods if group else [])]
        if experiments.data_size:
            runs += [RunSpec(m, f, default_labelled(config, m), seed) for m in experiments.data_size.methods
                     for f in experiments.data_size.fractions]
        if experiments.skill_data:
            runs += [RunSpec(m, 1.0, n, seed) for m in experiments.skill_data.methods
                     for n in experiments.skill_data.labelled]
    return sorted(set(runs), key=lambda r: r.order)


def run_recipe(config: StudyConfig, spec: RunSpec, data: StudyData, start: str) -> Recipe:
    """The training recipe of one run, from `start` (the pretrained tiny model or the checkpoint)."""
    router = {**config.router, "labelled": spec.labelled}
    stages = method_stages(spec.method, config.finetune, router, config.taxonomy,
                           str(data.labelled) if data.labelled else None)
    recipe = {**config.recipe, "model": start, "output_dir": str(run_dir(config, spec)), "seed": spec.seed,
              "data": {**config.recipe.get("data", {}), "train": str(data.train), "fraction": spec.fraction},
              "stages": stages}
    return study_recipe(recipe, source=f"{config.source}: run {spec.name}")


# Where a study's own keys land in the recipes it writes: errors name the study's keys.
STUDY_KEYS = {"stages.sft.": "finetune.", "stages.router.": "router.", "stages.pretrain.": "pretrain."}


def study_recipe(data: dict[str, Any], source: str) -> Recipe:
    """A recipe the study wrote; a bad option is reported under the study key that set it."""
    try:
        return recipe_from_dict(data, source=source)
    except RecipeError as error:
        message = str(error)
        for recipe_key, study_key in STUDY_KEYS.items():
            message = message.replace(recipe_key, study_key)
        raise StudyError(message) from None


def run_dir(config: StudyConfig, spec: RunSpec) -> Path:
    return config.out / "runs" / spec.name


def load_result(config: StudyConfig, spec: RunSpec) -> dict[str, Any] | None:
    path = run_dir(config, spec) / RUN_RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def execute(config: StudyConfig, spec: RunSpec, recipe: Recipe, data: StudyData,
            encodings: EncodingCache | None = None) -> dict[str, Any]:
    """Train (resuming what an interrupted run left), answer the test split, and measure."""
    out = run_dir(config, spec)
    train(recipe, resume=True, encodings=encodings)
    model, processor = load_model(str(out / FINAL_STAGE))
    test = list(read_jsonl(data.test))
    evaluation = evaluate(model, processor, test, data.test, out / "eval", config.generation.max_new_tokens,
                          config.generation.batch_size, config.score, config.judge)
    result = {"run": asdict(spec), "settings": run_settings(config, recipe), "scores": evaluation.scores,
              "trainable_params": trainable_params(model), "active_params": active_params(model),
              "total_params": sum(p.numel() for p in model.parameters()),
              "tokens_per_s": round(evaluation.tokens_per_s, 1), "expert_similarity": _similarity(model)}
    with atomic_path(out / RUN_RESULT_FILE) as temp:
        temp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_settings(config: StudyConfig, recipe: Recipe) -> dict[str, Any]:
    """What a run's result depends on: a finished run is reused only while these stay the same."""
    # Another judge gives other scores (its retries and workers only decide how it is asked).
    judge = {k: v for k, v in config.judge.items() if k in ("judge_model", "judge_base_url")}
    return {"recipe": recipe.to_dict(), "generation": asdict(config.generation), "score": config.score,
            **({"judge": judge} if judge else {})}


def _similarity(model: Any) -> float | None:
    """Mean cosine similarity between distinct routed experts over the MoE layers (None: dense)."""
    if not expert_blocks(model):
        return None
    pairs = [layer.routed_off_diagonal() for layer in expert_similarity(model)]
    means = [float(p.mean()) for p in pairs if p.size]
    return sum(means) / len(means) if means else None
