"""`mose study`: data, the general model, every run, then the tables, the figure and the report.

Everything is reused when present (data files, the pretrained model, finished
runs, their predictions), so an interrupted study continues where it stopped
and adding a seed or a method to a config runs only what is new. A folder is
reused only for the settings it was made with: the data, the pretraining and
each run's recipe are checked against what the config now says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from mose.data import DataError, read_jsonl
from mose.data.schema import atomic_path
from mose.eval.analysis import ModelAnalysis, analyze_model, sample_views
from mose.eval.predict import check_skill_labels
from mose.eval.predictions import read_predictions
from mose.eval.report import write_report
from mose.models.loading import load_for_inference
from mose.skills.taxonomy import load_taxonomy
from mose.study import summary
from mose.study.config import StudyConfig, StudyError
from mose.study.data import (
    Annotation,
    StudyData,
    annotate_questions,
    annotate_with_rules,
    curriculum_files,
    make_world,
    world_files,
    write_curriculum,
)
from mose.study.methods import METHODS, ORACLE_NOTE, final_stage
from mose.study.runs import (
    MEASURES,
    RunSpec,
    execute,
    load_result,
    main_run,
    plan_runs,
    run_dir,
    run_recipe,
    run_settings,
    study_recipe,
)
from mose.train import train
from mose.train.data import EncodingCache
from mose.train.recipe import Recipe

console = Console()
SETTINGS_FILE = "study.json"  # what the folder's data and general model were made with
STUDY_RESULTS_FILE = "results.json"


@dataclass
class StudyResults:
    config: StudyConfig
    data: StudyData
    annotation: Annotation | None
    runs: dict[RunSpec, dict[str, Any]]
    tables: dict[str, dict[str, dict[str, Any]]]  # table name → row → column → cell
    report: Path
    question_annotation: Annotation | None = None  # mose_question's labels (the question rules')


@contextmanager
def step(title: str) -> Iterator[dict[str, str]]:
    """A header, then one summary line (what the body put in `done["line"]`) with the time it took."""
    console.rule(f"[bold]{title}")
    done = {"line": ""}
    begin = time.perf_counter()
    yield done
    console.print(f"[green]✓[/green] {done['line']} [dim]({time.perf_counter() - begin:.0f} s)[/dim]")


def run_study(config: StudyConfig) -> StudyResults:
    """Run what is missing of a study and write OUT/results.json and OUT/report.html."""
    out = config.out
    specs = plan_runs(config)
    data = planned_data(config, specs)
    start = str(out / "pretrain" / "pretrain") if config.is_tiny else config.model
    # Every recipe is built, so checked, before any data is made or any model trained.
    pretraining = pretrain_recipe(config, data) if config.is_tiny else None
    recipes = {spec: run_recipe(config, spec, data, start) for spec in specs}
    _claim(config, specs)
    with step(f"{config.name}: data") as done:
        annotation = prepare_data(config, data)
        questions = (annotate_questions(data, config.question_rules, config.question_taxonomy)
                     if data.labelled_question else None)
        _check_oracle_labels(config, data)
        done["line"] = _data_line(data, annotation, questions)
    if pretraining is not None:
        with step(f"{config.name}: pretraining a general model") as done:
            metrics = train(pretraining, resume=True)["pretrain"]
            done["line"] = f"{config.model} on {data.pretrain} → {start}{_loss(metrics)}"
    runs, encodings = {}, EncodingCache()  # the runs train on one file: encode it once
    for i, spec in enumerate(specs, 1):
        with step(f"{config.name}: run {i}/{len(specs)} · {spec.name}") as done:
            reused = _reuse(config, spec, recipes[spec])
            runs[spec] = reused or execute(config, spec, recipes[spec], data, encodings)
            done["line"] = _run_line(config, spec, runs[spec]) + (" (reused)" if reused else "")
    tables = _tables(config, runs)
    with step(f"{config.name}: report") as done:
        report = _report(config, data, runs, tables)
        results = {"name": config.name, "config": config.to_dict(), "tables": tables,
                   "runs": [runs[s] for s in specs]}
        with atomic_path(out / STUDY_RESULTS_FILE) as temp:
            temp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        done["line"] = f"wrote {out / STUDY_RESULTS_FILE} and {report}"
    return StudyResults(config, data, annotation, runs, tables, report, questions)


def planned_data(config: StudyConfig, specs: list[RunSpec]) -> StudyData:
    """Where the study's data is, or will be once `prepare_data` has made it."""
    if config.world is not None:
        data = world_files(config.out / "data")
        data = replace(data, curriculum=curriculum_files(data.pretrain, len(config.curriculum)))
    else:
        data = StudyData(train=Path(config.data.train), test=Path(config.data.test),
                         labelled=Path(config.data.labelled) if config.data.labelled else None)
    # Labels for the routers, and for a benchmark's oracle (the world's records carry their own).
    methods = [METHODS[s.method] for s in specs]
    labels = any((m.routed and not m.question_skills) or (m.oracle and config.world is None)
                 for m in methods)
    if data.labelled is None and labels:
        data = replace(data, labelled=config.out / "data" / "labelled.jsonl")  # the shipped rules' labels
    if any(m.question_skills for m in methods):  # the question rules' labels of both splits
        data = replace(data, labelled_question=config.out / "data" / "labelled-question.jsonl",
                       test_question=config.out / "data" / "test-question.jsonl")
    return data


def prepare_data(config: StudyConfig, data: StudyData) -> Annotation | None:
    """Generate the world's missing splits (or check the given files), and label the training split
    with the shipped rules when MoSE needs labels the config does not give."""
    if config.world is not None:
        w = config.world
        make_world(config.out / "data", w.domain, w.pretrain_samples, w.train_samples, w.test_samples, w.seed)
        write_curriculum(data.pretrain, data.curriculum, [stage["kinds"] for stage in config.curriculum])
    else:
        given = [data.train, data.test, *([data.labelled] if config.data.labelled else [])]
        missing = [path for path in given if not path.is_file()]
        if missing:
            raise StudyError(f"{config.source}: no such data file {missing[0]}")
    if data.labelled is None or (config.data is not None and config.data.labelled):
        return None
    return annotate_with_rules(data.train, data.labelled)


def _check_oracle_labels(config: StudyConfig, data: StudyData) -> None:
    """The oracle answers by the test records' labelled chains: every one needs skills, known
    before any training (its fine-tuning data is checked with its recipe)."""
    if not any(METHODS[m].oracle for e in (config.experiments.main, config.experiments.diversity,
                                           config.experiments.data_size) if e for m in e.methods):
        return
    try:
        check_skill_labels(read_jsonl(data.test), load_taxonomy(config.taxonomy), str(data.test))
    except DataError as error:
        raise StudyError(f"{config.source}: mose_oracle routes by the test labels: {error}") from None


def pretrain_recipe(config: StudyConfig, data: StudyData) -> Recipe:
    """The tiny model's general pretraining: every weight, on the world's general questions only,
    after the curriculum's stages (each on its kinds' records, with `pretrain`'s options under its own)."""
    pretrain = {"stage": "backbone", "trainable": "all", **config.pretrain}
    stages = {f"curriculum_{i}": {**_under(pretrain, stage), "data": str(path)}
              for i, (stage, path) in enumerate(zip(config.curriculum, data.curriculum, strict=True), 1)}
    return study_recipe(
        {**config.recipe, "model": config.model, "output_dir": str(config.out / "pretrain"),
         "seed": config.world.seed, "data": {**config.recipe.get("data", {}), "train": str(data.pretrain)},
         "stages": {**stages, "pretrain": pretrain}},
        source=f"{config.source}: pretrain")


def _under(pretrain: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """A curriculum stage's options over the pretraining's; a stage that bounds its own length
    (`epochs` or `max_steps`) drops the pretraining's bound, which would otherwise override epochs."""
    bounds = {"epochs", "max_steps"}
    inherited = {k: v for k, v in pretrain.items() if not (bounds & stage.keys() and k in bounds)}
    return {**inherited, **{k: v for k, v in stage.items() if k != "kinds"}}


def _claim(config: StudyConfig, specs: list[RunSpec]) -> None:
    """Reuse a folder only for the same data, labels and general model; runs are checked one by one.

    The question labels' settings count once a study has made them (the first that runs
    `mose_question`); a study without it, before or after, leaves them as they are.
    """
    path = config.out / SETTINGS_FILE
    # The pretraining's stage checks its own settings; a curriculum added before it would not be
    # seen there (the later stage is retrained, the runs from the old model kept), so it counts here.
    keys = ["model", "world", "data", "taxonomy", "curriculum"]
    questions = ("question_taxonomy", "question_rules")
    if any(METHODS[s.method].question_skills for s in specs):
        keys += questions
    settings = {k: config.to_dict()[k] for k in keys}
    held = json.loads(path.read_text()) if path.is_file() else {}
    held = {"curriculum": [], **held} if held else held  # a folder made before curricula had none
    # A key the folder lacks differs, but for the question labels' (a folder made before them).
    differ = [k for k in keys if held and (k in held or k not in questions) and held.get(k) != settings[k]]
    if differ:
        raise StudyError(f"{config.out} holds a study made with other data, labels or another general "
                         f"model ({path}: {', '.join(differ)}); choose another output_dir or delete that "
                         "folder")
    config.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(json.dumps({**held, **settings}, indent=2) + "\n")


def _reuse(config: StudyConfig, spec: RunSpec, recipe: Recipe) -> dict[str, Any] | None:
    """A finished run's result, if it ran with this recipe (else a clear error, never a silent rerun)."""
    result = load_result(config, spec)
    if result is None:
        return None
    if result.get("settings") != run_settings(config, recipe, spec):
        raise StudyError(f"{run_dir(config, spec)} was run with other settings than {config.source} now "
                         "gives (finetune, router, recipe or generation options): choose another "
                         "output_dir or delete that run's folder")
    if result.get("measures") != MEASURES:  # measured otherwise: measure again (nothing retrains)
        return None
    return result


def _tables(config: StudyConfig, runs: dict[RunSpec, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    e = config.experiments
    builders = [("main comparison", e.main, summary.main_table),
                ("training-data size", e.data_size, summary.data_size_table),
                ("skill-data size", e.skill_data, summary.skill_data_table),
                ("expert diversity", e.diversity, summary.diversity_table)]
    return {name: build(config, runs) for name, experiment, build in builders if experiment}


def _report(config: StudyConfig, data: StudyData, runs: dict[RunSpec, dict[str, Any]],
            tables: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """Tables, the data-size figure, expert similarity (first seed) and sample answers of one MoSE run."""
    figures = {}
    if config.experiments.data_size:
        figures["training-data size"] = summary.data_size_figure(config, runs)
    analyses: list[ModelAnalysis] = []
    for method in config.experiments.diversity.methods if config.experiments.diversity else []:
        spec = main_run(config, method, config.seeds[0])
        stage = run_dir(config, spec) / final_stage(spec.method)
        model, processor = load_for_inference(str(stage), config.placement())
        path = data.test_for(METHODS[method].question_skills)  # labelled with the model's taxonomy
        analyses.append(analyze_model(model, processor, list(read_jsonl(path)), name=METHODS[method].label,
                                      batch_size=config.generation.batch_size, source=str(path)))
    shown = _sample_run(config, runs)
    test = list(read_jsonl(data.test_for(METHODS[shown.method].question_skills)))
    predictions = read_predictions(run_dir(config, shown) / "eval" / "predictions.jsonl")
    caption = f"{config.name} ({len(config.seeds)} seed(s): mean ± sd)"
    return write_report(config.out, title=config.name, models=analyses,
                        scores={f"{name} · {caption}{_note(rows)}": {"methods": rows}
                                for name, rows in tables.items()},
                        samples=sample_views(test, predictions, limit=6), figures=figures,
                        sources={"config": config.source, "train": str(data.train), "test": str(data.test),
                                 "runs": str(config.out / "runs"),
                                 "sample answers": f"{METHODS[shown.method].label} ({shown.name})"})


def _note(rows: dict[str, Any]) -> str:
    """The caption's footnote on a table with an oracle row: what its † means."""
    oracles = [m.label for m in METHODS.values() if m.oracle]
    return f" · {ORACLE_NOTE}" if any(label in rows for label in oracles) else ""


def _sample_run(config: StudyConfig, runs: dict[RunSpec, dict[str, Any]]) -> RunSpec:
    """Whose answers the report shows: a routed MoSE method's first main run if there is one (skill
    chains its own routers chose), never the oracle's if another method ran."""
    main = config.experiments.main.methods if config.experiments.main else []
    method = next((m for m in main if METHODS[m].routed), None)
    if method:
        return main_run(config, method, config.seeds[0])
    return min(runs, key=lambda s: (METHODS[s.method].oracle, s.order))


def _data_line(data: StudyData, annotation: Annotation | None, questions: Annotation | None = None) -> str:
    line = f"train {data.train}, test {data.test}"
    if annotation is not None:
        agreement = ("" if annotation.agreement is None else
                     f"; they agree with the records' own skills on {annotation.agreement:.1%} of levels")
        line += f"; rules {annotation.rules!r} labelled {annotation.samples} training records{agreement}"
    if questions is not None:
        line += (f"; rules {questions.rules!r} labelled {questions.samples} training and "
                 f"{questions.test_samples} test records with taxonomy {questions.taxonomy!r}")
    return line


def _run_line(config: StudyConfig, spec: RunSpec, result: dict[str, Any]) -> str:
    numbers = summary.headline(config.score, result["scores"])
    shown = ", ".join(f"{k} {v:.1f}" for k, v in numbers.items())
    return f"{METHODS[spec.method].label}: {shown}; {result['tokens_per_s']:.0f} answer tokens/s"


def _loss(metrics: dict[str, Any]) -> str:
    loss = metrics.get("loss")
    if metrics.get("skipped"):
        return " (reused)"
    return f", final loss {loss:.3f}" if isinstance(loss, float) else ""
