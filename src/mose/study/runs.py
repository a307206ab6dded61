"""The runs a study needs, and one run: fine-tune a method, answer the test split, measure.

Experiments share runs: the main comparison's MoSE at the full data and the
default labelled set is also the data-size curve's last point and one row of
the skill-data table, so it trains once. A run that finished left
`result.json` in its folder (written last, atomically) and is not run again.

A run's result holds its test scores and what the tables measure beside them:
the router stage's held-out accuracy and its linear-probe ceiling (`router`),
the answers' routing agreement with the test labels (`routing`), and expert
diversity over the experts the test split reached (`expert_similarity`,
`never_routed_experts`). A result measured by an earlier version of these
measures (`measures`) is measured again from the run's saved model and
predictions, never trained again.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mose.data import read_jsonl
from mose.data.schema import atomic_path
from mose.eval.batching import is_mose
from mose.eval.predictions import read_predictions
from mose.models.loading import load_for_inference
from mose.study.config import StudyConfig, StudyError
from mose.study.data import StudyData
from mose.study.measure import (
    active_params,
    diversity,
    engine_serves,
    evaluate,
    routing_on_test,
    trainable_params,
)
from mose.study.methods import METHODS, final_stage, method_stages
from mose.train import train
from mose.train.data import EncodingCache
from mose.train.recipe import Recipe, RecipeError, recipe_from_dict

RUN_RESULT_FILE = "result.json"
# The version of what `execute` measures beside the scores: a result with another is measured again.
MEASURES = 2  # 2: router-stage and test routing accuracy, diversity over the experts that got tokens
ROUTER_METRICS = ("router_acc/", "probe_acc/")  # the router stage's held-out metrics a result keeps


@dataclass(frozen=True)
class RunSpec:
    method: str
    fraction: float  # of the answer data
    labelled: int | None  # skill-labelled samples for the routers (MoSE methods; None: all there are)
    seed: int

    @property
    def name(self) -> str:
        name = f"{self.method}/f{self.fraction:g}"
        if METHODS[self.method].routed:
            name += f"-l{'all' if self.labelled is None else self.labelled}"
        return f"{name}-s{self.seed}"

    @property
    def order(self) -> tuple:
        """Seed, then method in METHODS' order, then data and labels: how runs are run and listed."""
        labelled = -1 if self.labelled is None else self.labelled
        return (self.seed, list(METHODS).index(self.method), self.fraction, labelled)


def default_labelled(config: StudyConfig, method: str) -> int | None:
    """The labelled set a method's routers learn from outside the skill-data experiment."""
    return config.router.get("labelled") if METHODS[method].routed else None


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
    # The oracle fine-tunes on labelled records: the world's carry their own skills; a benchmark's
    # are the labelled file's (data.labelled, or the shipped rules' labels of the training split).
    oracle_data = str(data.labelled) if config.world is None and data.labelled else None
    taxonomy, labelled, sft_data = config.taxonomy, data.labelled, None
    if METHODS[spec.method].question_skills:  # its routers and its fine-tuning read question labels
        if data.labelled_question is None:
            raise StudyError(f"{config.source}: run {spec.name} needs the question-labelled training split")
        taxonomy, labelled = config.question_taxonomy, data.labelled_question
        sft_data = str(labelled)
    stages = method_stages(spec.method, config.finetune, router, taxonomy,
                           str(labelled) if labelled else None, oracle_data, sft_data)
    recipe = {**config.recipe, "model": start, "output_dir": str(run_dir(config, spec)), "seed": spec.seed,
              "data": {**config.recipe.get("data", {}), "train": str(data.train), "fraction": spec.fraction},
              "stages": stages}
    return study_recipe(recipe, source=f"{config.source}: run {spec.name}")


# Where a study's own keys land in the recipes it writes: errors name the study's keys.
STUDY_KEYS = {"stages.sft.": "finetune.", "stages.router.": "router.", "stages.pretrain.": "pretrain.",
              "stages.curriculum_": "curriculum."}


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
    """Train (resuming what an interrupted run left), answer the test split, and measure.

    Finished stages and predictions are reused, so a finished run is only measured again.
    """
    out = run_dir(config, spec)
    stages = train(recipe, resume=True, encodings=encodings)
    final = out / final_stage(spec.method)
    model, processor = load_for_inference(str(final), config.placement())
    # Scored against its own taxonomy's labels (routing); the levels questions belong to, so the
    # scores by level, are the same under both labels (tests/unit/test_question_skills.py).
    test_path = data.test_for(METHODS[spec.method].question_skills)
    test = list(read_jsonl(test_path))
    forced = METHODS[spec.method].oracle
    served = engine_serves(model, config.generation.engine, forced)
    evaluation = evaluate(model, processor, test, test_path, out / "eval", config.generation.max_new_tokens,
                          config.generation.batch_size, config.score, config.judge, force_skills=forced,
                          vllm_from=final if served else None)
    predictions = read_predictions(out / "eval" / "predictions.jsonl")
    routing = (routing_on_test(predictions, test, model.mose_config.taxonomy.level_names)
               if is_mose(model) else None)
    experts = diversity(model, processor, test, batch_size=config.generation.batch_size,
                        force_skills=forced, source=str(test_path))
    result = {"run": asdict(spec), "settings": run_settings(config, recipe, spec), "measures": MEASURES,
              "scores": evaluation.scores, "trainable_params": trainable_params(model),
              "active_params": active_params(model),
              "total_params": sum(p.numel() for p in model.parameters()),
              "tokens_per_s": round(evaluation.tokens_per_s, 1), "engine": evaluation.engine,
              "router": router_metrics(stages.get("router")), "routing": routing,
              "expert_similarity": None if experts is None else experts.similarity,
              "never_routed_experts": None if experts is None else experts.never_routed,
              "routed_experts": None if experts is None else experts.experts}
    with atomic_path(out / RUN_RESULT_FILE) as temp:
        temp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def router_metrics(stage: dict[str, Any] | None) -> dict[str, float] | None:
    """The router stage's held-out metrics (fractions): its routers' accuracy per level and chain
    (`router_acc/...`) and the linear probe's on the same pooled inputs (`probe_acc/...`)."""
    if stage is None:
        return None
    return {k: float(v) for k, v in stage.items()
            if k.startswith(ROUTER_METRICS) and isinstance(v, int | float) and math.isfinite(v)}


def run_settings(config: StudyConfig, recipe: Recipe, spec: RunSpec | None = None) -> dict[str, Any]:
    """What a run's result depends on: a finished run is reused only while these stay the same."""
    # Another judge gives other scores (its retries and workers only decide how it is asked).
    judge = {k: v for k, v in config.judge.items() if k in ("judge_model", "judge_base_url")}
    forced = spec is not None and METHODS[spec.method].oracle  # answers routed by the test labels
    generation = asdict(config.generation)
    if generation["engine"] == "torch":  # as every study before the setting: their runs stay reused
        del generation["engine"]
    return {"recipe": recipe.to_dict(), "generation": generation, "score": config.score,
            **({"judge": judge} if judge else {}), **({"test_routes": "labelled"} if forced else {})}
