"""Study configs: which benchmark, which methods, which budget, which seeds and experiments.

A study is YAML (`base:` inheritance and `key=value` overrides as for recipes):

    name: driving world
    output_dir: runs/study/driving
    world: {domain: driving, pretrain_samples: 6000, train_samples: 6000, test_samples: 400}
    model: tiny:qwen2_vl            # a tiny model is first pretrained on the world's general kinds
    pretrain: {max_steps: 1200, lr: 2.0e-3, batch_size: 16}
    curriculum: [{kinds: [count], max_steps: 600}]   # optional stages before it, on some kinds
    finetune: {epochs: 2, lr: 1.0e-3, batch_size: 16}        # the same for every method
    router: {labelled: 1000}        # MoSE's router stage: its own defaults train it to convergence
    seeds: [0, 1, 2]
    experiments:
      main: {methods: [dense_sft, moe_4x1, moe_8x1, mose, mose_groups, mose_oracle]}
      data_size: {methods: [moe_4x1, mose], fractions: [0.25, 0.5, 1.0]}
      skill_data: {methods: [mose], labelled: [500, 1000, 2000]}
      diversity: {methods: [moe_4x1, mose]}

`device` and `dtype` say where the trained models answer the test split (predictions,
expert diversity, the report's analyses), as `mose predict --device --dtype` does: both
default to `auto` (the GPU in bfloat16 where there is one, else the CPU in float32). Training's
device is Accelerate's and its precision `recipe.mixed_precision` / `recipe.dtype`.

`mose_question` (MoSE on skills the question fixes) converts with `question_taxonomy` and
labels the training and test splits with `question_rules`; both default by `taxonomy`
(`QUESTION_SKILLS`: driving → driving-question, world-driving-question).

Instead of `world`, `data: {train, test, labelled}` names a benchmark's converted
files (`mose data convert`) and `score` its scorer; `model` is then a real
checkpoint, which is fine-tuned as it is (no pretraining).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mose.data.world import DOMAINS
from mose.eval.score import BENCHES, JUDGE_OPTIONS
from mose.models.device import Placement, resolve_placement
from mose.skills.rules import RuleAnnotator
from mose.study.methods import METHODS
from mose.train.recipe import RecipeError, apply_override, build_options, check_range, read_with_base
from mose.train.shipped import recipe_path


class StudyError(RecipeError):
    """A study config that cannot run: names the file and the key."""


# taxonomy → (question taxonomy, the shipped rules that label it): `mose_question`'s defaults.
# The robot world's shipped rules already read only the question, so its question skills are
# its own taxonomy's (and `mose_question` repeats `mose` there).
QUESTION_SKILLS = {"driving": ("driving-question", "world-driving-question"),
                   "robot": ("robot", "world-robot")}


@dataclass
class WorldOptions:
    """The procedural world, generated in three disjoint splits."""

    domain: Literal["driving", "robot"] = field(metadata={"help": "Which world: driving or robot."})
    pretrain_samples: int = field(default=6000, metadata={"help":
        "General questions (`--general`) for the tiny model's pretraining."})
    train_samples: int = field(default=6000, metadata={"help":
        "Benchmark questions every method fine-tunes on."})
    test_samples: int = field(default=400, metadata={"help":
        "Benchmark questions every method is scored on."})
    seed: int = field(default=0, metadata={"help": "The data's seed (the runs' seeds are `seeds`)."})

    def __post_init__(self) -> None:
        check_range(self, pretrain_samples=(1, None, True), train_samples=(1, None, True),
                    test_samples=(1, None, True))


@dataclass
class DataFiles:
    """A benchmark's records (`mose data convert`) instead of a generated world."""

    train: str = field(metadata={"help": "Converted training records (`mose data convert`)."})
    test: str = field(metadata={"help": "Converted test records."})
    labelled: str | None = field(default=None, metadata={"help":
        "Skill-labelled records for the routers (default: shipped rules on train)."})


@dataclass
class MethodsExperiment:
    methods: list[str] = field(metadata={"help": "The methods compared (see the methods table)."})


@dataclass
class DataSizeExperiment:
    """The paper's Fig. 7: accuracy against the fraction of answer data fine-tuned on."""

    methods: list[str] = field(metadata={"help": "The methods compared."})
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0], metadata={"help":
        "Fractions of the fine-tuning data, each > 0 and <= 1."})

    def __post_init__(self) -> None:
        for i, fraction in enumerate(self.fractions):
            if not 0 < fraction <= 1:
                raise StudyError(f"fractions[{i}] is {fraction}; it must be > 0 and <= 1")


@dataclass
class SkillDataExperiment:
    """The paper's Table 3: skill-labelled samples the routers learn from."""

    labelled: list[int] = field(metadata={"help": "Sizes of the skill-labelled set the routers learn from."})
    methods: list[str] = field(default_factory=lambda: ["mose"], metadata={"help":
        "Methods with skill routers."})

    def __post_init__(self) -> None:
        for i, size in enumerate(self.labelled):
            if size < 1:
                raise StudyError(f"labelled[{i}] is {size}; it must be >= 1")
        unrouted = [m for m in self.methods if m in METHODS and not METHODS[m].routed]
        if unrouted:
            raise StudyError(f"methods names {unrouted[0]!r}, which has no skill routers to learn "
                             "from labels")


@dataclass
class Experiments:
    main: MethodsExperiment | None = field(default=None, metadata={"help":
        "The paper's Tables 1 and 2: every method's accuracy, routing and parameters."})
    data_size: DataSizeExperiment | None = field(default=None, metadata={"help":
        "The paper's Fig. 7: accuracy against the fraction of the fine-tuning data."})
    skill_data: SkillDataExperiment | None = field(default=None, metadata={"help":
        "The paper's Table 3: accuracy against the number of skill-labelled samples."})
    diversity: MethodsExperiment | None = field(default=None, metadata={"help":
        "The paper's Fig. 8: expert similarity."})


@dataclass
class Generation:
    max_new_tokens: int = field(default=16, metadata={"help": "Answer tokens generated per test question."})
    batch_size: int = field(default=32, metadata={"help": "Test questions answered per batch."})
    engine: Literal["torch", "vllm"] = field(default="torch", metadata={"help":
        "What generates the answers: torch (mose's own) or vllm (`mose predict --engine vllm`) for "
        "the methods an exported adapter reproduces (mose_lora); the others answer with torch, and "
        "each run's result records its engine."})

    def __post_init__(self) -> None:
        check_range(self, max_new_tokens=(1, None, True), batch_size=(1, None, True))
        if self.engine not in ("torch", "vllm"):
            raise StudyError(f"generation.engine: {self.engine!r} is not torch or vllm")


@dataclass
class StudyConfig:
    name: str = field(metadata={"help": "The study's title in the report."})
    output_dir: str = field(metadata={"help": "Where runs, results.json and report.html go."})
    experiments: Experiments = field(metadata={"help":
        "The experiments, each a table in the report (see below)."})
    model: str = field(default="tiny:qwen2_vl", metadata={"help":
        "tiny:qwen2_vl (pretrained on the world's general questions first) or a real checkpoint (fine-tuned "
        "as it is)."})
    world: WorldOptions | None = field(default=None, metadata={"help":
        "The procedural world (give this or data)."})
    data: DataFiles | None = field(default=None, metadata={"help":
        "A benchmark's converted files (give this or world)."})
    score: str | None = field(default=None, metadata={"help":
        "The scorer (`mose score`): world (the default with `world`), robo2vlm, drivelm, coda-lm."})
    judge: dict = field(default_factory=dict, metadata={"help":
        "coda-lm's judge options (judge_model, judge_base_url, ...)."})
    taxonomy: str | None = field(default=None, metadata={"help":
        "MoSE's skills; default: the world's domain."})
    question_taxonomy: str | None = field(default=None, metadata={"help":
        "mose_question's skills; default: QUESTION_SKILLS[taxonomy]."})
    question_rules: str | None = field(default=None, metadata={"help":
        "The rules that label them (shipped name or YAML); default: the same."})
    pretrain: dict | None = field(default=None, metadata={"help":
        "Backbone-stage options of the tiny model's pretraining."})
    curriculum: list[dict] = field(default_factory=list, metadata={"help":
        "Stages run before `pretrain`, each on the general records of its `kinds`; its other keys are "
        "backbone options over `pretrain`'s."})
    finetune: dict = field(default_factory=dict, metadata={"help":
        "Training options every method's fine-tuning shares."})
    router: dict = field(default_factory=dict, metadata={"help":
        "Router-stage options (MoSE): labelled, epochs, ..."})
    recipe: dict = field(default_factory=dict, metadata={"help":
        "Recipe keys of every run: mixed_precision, dtype, data."})
    generation: Generation = field(default_factory=Generation, metadata={"help":
        "How the test split is answered."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help":
        "Fine-tuning seeds; every cell is the mean ± sample sd over them."})
    device: str = field(default="auto", metadata={"help":
        "Where evaluation runs: auto, cpu, cuda, cuda:N, mps (training: Accelerate's)."})
    dtype: str = field(default="auto", metadata={"help":
        "Evaluation's dtype: auto, float32, bfloat16, float16 (training: recipe.dtype)."})
    source: str = field(default="<study>", metadata={"help":
        "The file it came from, for error messages (not a key)."})

    def __post_init__(self) -> None:
        if (self.world is None) == (self.data is None):
            raise StudyError("give exactly one of 'world' (the procedural world) or 'data' "
                             "(a benchmark's train/test files)")
        if self.score is None and self.data is not None:
            raise StudyError("'data' needs 'score': the scorer of its benchmark (robo2vlm, drivelm, coda-lm)")
        self.score = self.score or "world"
        if self.score not in BENCHES:
            raise StudyError(f"'score' is {self.score!r}; choose one of {', '.join(BENCHES)}")
        self._check_judge()
        if self.taxonomy is None and self.world is not None:
            self.taxonomy = self.world.domain
        default = QUESTION_SKILLS.get(self.taxonomy)
        if default and self.question_taxonomy in (None, default[0]):
            self.question_taxonomy = default[0]
            self.question_rules = self.question_rules or default[1]
        if self.is_tiny and (self.pretrain is None or self.world is None):
            raise StudyError("a tiny model starts from random weights: it needs 'world' (whose general "
                             "questions it is pretrained on) and 'pretrain' options")
        if self.pretrain is not None and not self.is_tiny:
            raise StudyError(f"'pretrain' is for tiny models; {self.model} is fine-tuned as it is")
        self._check_curriculum()
        if not isinstance(self.recipe.get("data", {}), dict):
            raise StudyError("recipe.data must be a mapping of data options (max_length, max_pixels, ...)")
        shared = set(self.recipe) - {"mixed_precision", "dtype", "data"}
        if shared:  # the study sets the rest (model, output_dir, seed, stages) per run
            raise StudyError(f"recipe.{sorted(shared)[0]} cannot be shared by every run; "
                             "recipe takes mixed_precision, dtype and data")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError("'seeds' must be a non-empty list of distinct seeds")
        for name, experiment in asdict(self.experiments).items():
            if experiment is not None and not experiment["methods"]:
                raise StudyError(f"experiments.{name}.methods is empty: name at least one method")
            for method in (experiment or {}).get("methods", []):
                if method not in METHODS:
                    raise StudyError(f"experiments.{name}.methods names {method!r}; "
                                     f"choose from {', '.join(METHODS)}")
        if not any(asdict(self.experiments).values()):
            raise StudyError("'experiments' names none of main, data_size, skill_data, diversity")
        if self.experiments.skill_data and self.router.get("max_steps") is not None:
            raise StudyError("router.max_steps gives every labelled-set size of skill_data the same "
                             "number of steps, so the larger sets get fewer passes over their labels: "
                             "bound the router stage by router.epochs (or leave it to the stage's "
                             "defaults)")
        try:  # a GPU the machine lacks is known now, not after hours of training
            self.placement()
        except ValueError as error:
            raise StudyError(str(error)) from None
        if self.uses_mose and self.taxonomy is None:
            raise StudyError("MoSE methods need 'taxonomy' (driving, robot or a YAML file)")
        if self.uses_question_skills:
            self._check_question_skills()

    def _check_curriculum(self) -> None:
        """Each stage names general kinds its world asks (its training options the recipe checks)."""
        if self.curriculum and self.pretrain is None:
            raise StudyError("'curriculum' stages run before 'pretrain': they need a tiny model's "
                             "pretraining")
        known = DOMAINS[self.world.domain].GENERAL_KINDS if self.world else ()
        for i, stage in enumerate(self.curriculum, 1):
            kinds = stage.get("kinds") if isinstance(stage, dict) else None
            if not kinds or not isinstance(kinds, list):
                raise StudyError(f"curriculum.{i} needs 'kinds': a list of the world's general kinds "
                                 f"({', '.join(known)})")
            unknown = [k for k in kinds if k not in known]
            if unknown:
                raise StudyError(f"curriculum.{i}.kinds names {unknown[0]!r}; the {self.world.domain} "
                                 f"world's general kinds are {', '.join(known)}")

    def _check_question_skills(self) -> None:
        """mose_question's taxonomy and rules, loaded (so checked) before any work."""
        missing = next((k for k in ("question_taxonomy", "question_rules") if getattr(self, k) is None), None)
        if missing:
            shipped = "; ".join(f"{t}: {q}, {r}" for t, (q, r) in QUESTION_SKILLS.items())
            raise StudyError(f"mose_question needs '{missing}' (the defaults per taxonomy: {shipped})")
        try:
            RuleAnnotator.load(self.question_rules, taxonomy=self.question_taxonomy)
        except ValueError as error:
            raise StudyError(f"question_rules {self.question_rules!r} for question_taxonomy "
                             f"{self.question_taxonomy!r}: {error}") from None

    def _check_judge(self) -> None:
        """CODA-LM's judge, from `judge` or, as `mose score` reads it, the environment."""
        unknown = set(self.judge) - set(JUDGE_OPTIONS)
        if unknown:
            raise StudyError(f"unknown judge option(s) {sorted(unknown)}; known: {', '.join(JUDGE_OPTIONS)}")
        if self.score != "coda-lm":
            return
        env = {"judge_model": os.environ.get("MOSE_JUDGE_MODEL"),
               "judge_base_url": os.environ.get("MOSE_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")}
        self.judge = {**self.judge, **{k: v for k, v in env.items() if self.judge.get(k) is None and v}}
        missing = [k for k in env if not self.judge.get(k)]
        if missing:
            raise StudyError(f"coda-lm is scored by an LLM judge: set judge.{missing[0]} (or "
                             "MOSE_JUDGE_MODEL / MOSE_JUDGE_BASE_URL or OPENAI_BASE_URL) before any training")

    def placement(self) -> Placement:
        """The device and dtype the trained models are evaluated in (`device`, `dtype` resolved)."""
        return resolve_placement(self.device, self.dtype)

    @property
    def is_tiny(self) -> bool:
        return self.model.startswith("tiny:")

    @property
    def uses_mose(self) -> bool:
        return any(METHODS[m].mose for e in asdict(self.experiments).values() if e
                   for m in e.get("methods", []))

    @property
    def uses_question_skills(self) -> bool:
        return any(METHODS[m].question_skills for e in asdict(self.experiments).values() if e
                   for m in e.get("methods", []))

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read a study (with its `base:`), apply `key=value` overrides, and validate. `path` may
    also name a shipped study (`study/driving`), so an installed mose runs them as they are."""
    try:
        path = recipe_path(path)
        data = read_with_base(path, what="study")
        for item in overrides:
            apply_override(data, item, path)
    except ValueError as error:  # RecipeError, or a name that is neither a file nor shipped
        raise StudyError(str(error)) from None
    return study_from_dict(data, source=str(path))


def study_from_dict(data: dict[str, Any], source: str = "<study>") -> StudyConfig:
    try:
        return build_options(StudyConfig, {**data, "source": source}, source, "")
    except RecipeError as error:  # the messages name the file and the key already
        raise StudyError(str(error)) from None
