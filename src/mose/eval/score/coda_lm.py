"""CODA-LM: the text-only LLM judge for general perception, region perception and suggestion.

The protocol is the benchmark's (`benchmarks.md`), the prompts are mose's own:
the judge reads the reference and the prediction, each between begin/end
markers, never the image, and ends its reply with `Rating: [[n]]`, 1..10.
General perception and driving suggestion get a system prompt on what to weigh
and two few-shot examples (one graded high, one low); region perception is
zero-shot, on text similarity and relevance. Temperature 0.

A task's score is the plain mean of its ratings (1..10) and `score_x10` the same
times ten, the way papers print it. Region perception is also broken down by
object class (`meta.category` mapped to the seven classes; a region with no
known category is `miscellaneous`), its total pooling all regions. A judgment
that fails (the endpoint still erring after its retries, or a reply with no
rating even after `parse_retries` more asks) is counted in `failed`, listed in
`failures`, and left out of the mean: never dropped silently.

Every rating is appended to a JSONL cache (flushed line by line) keyed by the
hash of (judge model, full prompt), so a rerun asks nothing already judged and
an interrupted run resumes; failures are not cached, so a rerun asks them again.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, TextColumn
from rich.table import Table

from mose.endpoint import ChatEndpoint, EndpointError
from mose.eval.score.common import Pair, ScoreError, fmt, require_answer

# sample task (as the CODA-LM loader writes it) → the name scores use
TASKS = {"general_perception": "general", "region_perception": "region", "driving_suggestion": "suggestion"}
CLASSES = ("vehicle", "vru", "traffic_sign", "traffic_light", "traffic_cone", "barrier", "miscellaneous")
_CLASS_OF = {
    **dict.fromkeys(("vehicle", "vehicles", "car", "truck", "bus", "van", "suv", "tram", "train", "trailer",
                     "tricycle", "bicycle", "motorcycle", "moped", "scooter", "construction_vehicle",
                     "recreational_vehicle", "emergency_vehicle"), "vehicle"),
    **dict.fromkeys(("vru", "vulnerable_road_user", "vulnerable_road_users", "pedestrian", "pedestrians",
                     "person", "people", "child", "cyclist", "motorcyclist", "rider", "stroller",
                     "wheelchair"), "vru"),
    **dict.fromkeys(("traffic_sign", "traffic_signs", "sign", "warning_sign", "road_sign"), "traffic_sign"),
    **dict.fromkeys(("traffic_light", "traffic_lights", "signal", "traffic_signal"), "traffic_light"),
    **dict.fromkeys(("traffic_cone", "traffic_cones", "cone", "cones"), "traffic_cone"),
    **dict.fromkeys(("barrier", "barriers", "bollard", "concrete_block", "fence", "guardrail",
                     "water_barrier", "barricade", "traffic_barrier"), "barrier"),
}
FATAL_STATUS = (401, 403, 404)  # wrong key, no access, unknown model: every sample would fail


def region_class(category: Any) -> str:
    """One of CLASSES for a CODA category name ("traffic cones", "Traffic-Cone", "bollard"...)."""
    if not isinstance(category, str):
        return "miscellaneous"
    key = re.sub(r"[\s\-]+", "_", category.strip().lower())
    return _CLASS_OF.get(key, "miscellaneous")


# ---------------------------------------------------------------- prompts (mose's own wording)

_FORMAT = ("Give one or two sentences of justification, then the grade on its own line, an integer "
           "from 1 to 10, written exactly as: Rating: [[n]]")
GENERAL_SYSTEM = (
    "You grade an AI assistant's description of a driving scene seen from the ego car. You do not "
    "see the image: a human expert's reference description is the ground truth, and you grade the "
    "assistant's description against it alone. Weigh three things.\n"
    "1. Accuracy of objects: are the objects the reference names (vehicles, vulnerable road users, "
    "traffic signs and lights, cones, barriers, other objects) found, with the right kind, "
    "position and heading?\n"
    "2. Hallucination: every object or detail that the reference does not support lowers the grade.\n"
    "3. Consistency of reasons: does the assistant explain, as the reference does, why each object "
    "matters to the ego car?\n"
    "Length and style earn nothing. 1 means unrelated or invented, 10 means everything in the "
    "reference and nothing invented. " + _FORMAT)
SUGGESTION_SYSTEM = (
    "You grade an AI assistant's driving suggestions for the ego car in a scene you do not see. A "
    "human expert's reference suggestion is the ground truth; grade the assistant's suggestion "
    "against it alone. Weigh three things.\n"
    "1. Rationality: is the advice safe and sensible for the situation the reference describes?\n"
    "2. Relevance: does it answer the hazards and objects the reference is about, rather than "
    "generic ones?\n"
    "3. Detail: does it name concrete actions (speed, lane, distance, what to watch) as the "
    "reference does?\n"
    "Length and style earn nothing. 1 means unsafe or beside the point, 10 means as sound, relevant "
    "and specific as the reference. " + _FORMAT)
REGION_SYSTEM = (
    "You grade an AI assistant's description of one object that a box marks in a driving scene. You "
    "do not see the image: compare the assistant's text with a human expert's reference text. Grade "
    "how similar and relevant it is: the same object (kind, appearance, position), and the same "
    "account of how it affects the ego car's driving. 1 means a different object or an unrelated "
    "text, 10 means the same object and the same explanation. " + _FORMAT)

_FEW_SHOT = {
    "general": [
        ("Vehicles: a white van is parked on the right shoulder ahead; it could pull out into the ego "
         "lane, so the ego car should watch it. Traffic cones: three orange cones close the left lane, "
         "so the ego car cannot use that lane.",
         "A white van stands on the right side of the road ahead and might merge into our lane. "
         "Orange cones block the left lane, so the ego car has to stay out of it.",
         "Both objects are found with the right kind and position, the reasons agree, and nothing is "
         "invented.\nRating: [[9]]"),
        ("Vulnerable road users: a cyclist rides along the right edge of the ego lane, close ahead; "
         "the ego car must keep a safe gap when passing.",
         "A red bus is turning left at a green traffic light, and two pedestrians wait at a crossing "
         "on the left.",
         "The cyclist is missed, and the bus, the light and the pedestrians are not in the reference: "
         "the description is invented.\nRating: [[2]]"),
    ],
    "suggestion": [
        ("Slow down and keep to the ego lane; the cyclist on the right may swerve around the parked "
         "car, so leave room and be ready to brake.",
         "Reduce speed, stay in your lane and give the cyclist on the right extra space in case they "
         "move out around the parked car.",
         "Safe, about the same cyclist and parked car, and as specific as the reference.\n"
         "Rating: [[9]]"),
        ("Stop behind the white line: the light ahead is red and pedestrians are crossing.",
         "Keep your speed and overtake the vehicles ahead using the right lane.",
         "It ignores the red light and the crossing pedestrians and suggests an unsafe manoeuvre.\n"
         "Rating: [[1]]"),
    ],
    "region": [],
}
_SYSTEM = {"general": GENERAL_SYSTEM, "suggestion": SUGGESTION_SYSTEM, "region": REGION_SYSTEM}


def _pair_text(reference: str, prediction: str) -> str:
    return (f"[Reference begins]\n{reference}\n[Reference ends]\n\n"
            f"[Assistant's answer begins]\n{prediction}\n[Assistant's answer ends]")


def judge_messages(task: str, reference: str, prediction: str) -> list[dict[str, Any]]:
    """The chat messages that ask for one rating; `task` is general, region or suggestion."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": _SYSTEM[task]}]
    for example_ref, example_pred, verdict in _FEW_SHOT[task]:
        messages += [{"role": "user", "content": _pair_text(example_ref, example_pred)},
                     {"role": "assistant", "content": verdict}]
    messages.append({"role": "user", "content": _pair_text(reference, prediction)})
    return messages


# ---------------------------------------------------------------- ratings

class UnparsableRating(ValueError):
    pass


_RATING = re.compile(r"rating\s*:?\s*\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]", re.I)
_BRACKETED = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")


def parse_rating(reply: str) -> float:
    """The last `Rating: [[n]]` of a reply, else its last `[[n]]`; must lie in 1..10."""
    found = _RATING.findall(reply) or _BRACKETED.findall(reply)
    if not found:
        raise UnparsableRating("no [[n]] rating in the reply")
    value = float(found[-1])
    if not 1 <= value <= 10:
        raise UnparsableRating(f"rating {found[-1]} is outside 1..10")
    return value


# ---------------------------------------------------------------- settings, cache, asking

@dataclass
class JudgeSettings:
    """Where and how to ask the judge. The key is read from the environment variable named."""

    model: str
    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str | Path = "runs/judge-cache"
    workers: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4  # per request, transient failures (connection, timeout, 429, 5xx)
    backoff_s: float = 1.0  # first wait; doubles each retry
    parse_retries: int = 1  # asks again when a reply has no rating
    abort_after: int = 20  # consecutive endpoint failures, no success between: the endpoint is down

    def __post_init__(self) -> None:
        for name in ("model", "base_url"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"judge setting {name!r} is required (the judge model and its base URL)")
        for name, low in (("workers", 1), ("max_retries", 0), ("parse_retries", 0), ("abort_after", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"judge setting {name!r} must be an integer >= {low}, "
                                 f"got {getattr(self, name)!r}")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("judge settings timeout_s must be > 0 and backoff_s >= 0")

    def endpoint(self) -> ChatEndpoint:
        return ChatEndpoint(self.base_url, self.model, api_key_env=self.api_key_env,
                            max_retries=self.max_retries, backoff_s=self.backoff_s,
                            timeout_s=self.timeout_s, temperature=0.0)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) / "judgments.jsonl"


def cache_key(model: str, messages: list[dict[str, Any]]) -> str:
    """Same judge model and same full prompt → same rating."""
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()


def load_cache(path: Path) -> dict[str, str]:
    """key → reply of every cached judgment whose reply still parses."""
    cache: dict[str, str] = {}
    if not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            parse_rating(entry["reply"])
        except (json.JSONDecodeError, KeyError, TypeError, UnparsableRating):
            continue  # a line torn by an interruption: that sample is asked again
        cache[entry["key"]] = entry["reply"]
    return cache


@dataclass
class Outcome:
    rating: float | None
    reason: str | None = None  # why it failed
    endpoint_failed: bool = False


def _ask(endpoint: ChatEndpoint, messages: list[dict[str, Any]], parse_retries: int) -> tuple[Outcome, str]:
    """(outcome, reply) of one judgment; runs in a worker thread."""
    reply = ""
    problem = ""
    for _ in range(parse_retries + 1):
        try:
            reply = endpoint.ask(messages)
        except EndpointError as error:
            if not error.transient and error.status in FATAL_STATUS:
                raise
            return Outcome(None, f"endpoint: {error}", endpoint_failed=True), ""
        try:
            return Outcome(parse_rating(reply)), reply
        except UnparsableRating as error:
            problem = str(error)
    return Outcome(None, f"unparsable reply ({problem}): {reply[:120]!r}"), reply


@dataclass
class JudgeReport:
    asked: int = 0
    cached: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # sample id → outcome


def judge(items: list[tuple[str, list[dict[str, Any]]]], settings: JudgeSettings,
          progress: bool = False) -> JudgeReport:
    """Rate every (sample id, messages): from the cache, else by the endpoint in a thread pool."""
    path = settings.cache_path
    cache = load_cache(path)
    report = JudgeReport()
    todo = []
    for sample_id, messages in items:
        key = cache_key(settings.model, messages)
        if key in cache:
            report.outcomes[sample_id] = Outcome(parse_rating(cache[key]))
            report.cached += 1
        else:
            todo.append((sample_id, key, messages))
    if not todo:
        return report
    endpoint = settings.endpoint()
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="judge")
    columns = [*Progress.get_default_columns(), TextColumn("{task.fields[failed]} failed")]
    try:
        with path.open("a", encoding="utf-8") as log, Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(f"judging with {settings.model}", total=len(todo), failed=0)
            futures: dict[Future, tuple[str, str]] = {
                pool.submit(_ask, endpoint, messages, settings.parse_retries): (sample_id, key)
                for sample_id, key, messages in todo}
            failed = down = 0
            for future in as_completed(futures):
                sample_id, key = futures[future]
                outcome, reply = future.result()
                report.asked += 1
                report.outcomes[sample_id] = outcome
                if outcome.rating is not None:
                    log.write(json.dumps({"key": key, "id": sample_id, "model": settings.model,
                                          "rating": outcome.rating, "reply": reply}) + "\n")
                    log.flush()  # each judgment is kept the moment it arrives
                    down = 0
                else:
                    failed += 1
                    down = down + 1 if outcome.endpoint_failed else 0
                    if settings.abort_after and down >= settings.abort_after:
                        raise EndpointError(f"{settings.base_url}: {down} judgments in a row failed "
                                            f"(last: {outcome.reason}); the endpoint looks down. The "
                                            f"ratings so far are cached in {path}: rerun to resume")
                bar.update(task, advance=1, failed=failed)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return report


# ---------------------------------------------------------------- scoring

def score(pairs: list[Pair], settings: JudgeSettings, progress: bool = False) -> dict[str, Any]:
    """{task: {"score", "score_x10", "n", "failed", "failures"}, ...} for each task present;
    region also "by_class"; "average" when all three are present; "judge": judgments asked / cached."""
    items, tasks = [], {}
    for pair in pairs:
        sample = pair.sample
        if sample.task not in TASKS:
            raise ScoreError(f"reference {sample.id!r}, field 'task': {sample.task!r} is not a CODA-LM "
                             f"task ({', '.join(TASKS)})")
        tasks[sample.id] = TASKS[sample.task]
        items.append((sample.id, judge_messages(TASKS[sample.task], require_answer(pair),
                                                pair.prediction.answer)))
    report = judge(items, settings, progress)
    by_task: dict[str, list[str]] = defaultdict(list)
    for sample_id, task in tasks.items():
        by_task[task].append(sample_id)
    result: dict[str, Any] = {}
    for task in ("general", "region", "suggestion"):
        if task in by_task:
            result[task] = _summary(by_task[task], report.outcomes)
    if "region" in result:
        classes: dict[str, list[str]] = {c: [] for c in CLASSES}
        for pair in pairs:
            if tasks[pair.sample.id] == "region":
                classes[region_class(pair.sample.meta.get("category"))].append(pair.sample.id)
        result["region"]["by_class"] = {c: _summary(ids, report.outcomes, failures=False)
                                        for c, ids in classes.items()}
    scored = [result[t]["score"] for t in ("general", "region", "suggestion") if t in result]
    if len(scored) == 3 and None not in scored:
        mean = statistics.fmean(scored)
        result["average"] = {"score": round(mean, 4), "score_x10": round(10 * mean, 4)}
    result["judge"] = {"model": settings.model, "asked": report.asked, "cached": report.cached}
    return result


def _summary(ids: list[str], outcomes: dict[str, Outcome], failures: bool = True) -> dict[str, Any]:
    ratings = [outcomes[i].rating for i in ids if outcomes[i].rating is not None]
    mean = statistics.fmean(ratings) if ratings else None
    out: dict[str, Any] = {"score": None if mean is None else round(mean, 4),
                           "score_x10": None if mean is None else round(10 * mean, 4),
                           "n": len(ids), "failed": len(ids) - len(ratings)}
    if failures:
        failed = [{"id": i, "reason": outcomes[i].reason} for i in ids if outcomes[i].rating is None]
        out["failures"] = failed[:20]  # the count is in "failed"; these are examples
    return out


def table(scores: dict[str, Any], title: str = "CODA-LM (LLM judge)") -> Table:
    out = Table("task", "score (1..10)", "×10", "n", "failed", title=title)

    def row(name: str, cell: dict[str, Any]) -> None:
        failed = f"[red]{cell['failed']}[/red]" if cell["failed"] else "0"
        out.add_row(name, fmt(cell["score"]), fmt(cell["score_x10"]), str(cell["n"]), failed)

    for task in ("general", "region", "suggestion"):
        if task in scores:
            row(task, scores[task])
    if "average" in scores:
        out.add_row("[bold]average[/bold]", fmt(scores["average"]["score"]),
                    f"[bold]{fmt(scores['average']['score_x10'])}[/bold]", "", "")
    if "region" in scores:
        out.add_section()
        for name, cell in scores["region"]["by_class"].items():
            row(f"  region: {name}", cell)
    judge_info = scores.get("judge")
    if judge_info:
        out.caption = (f"judge {judge_info['model']}: {judge_info['asked']} asked, "
                       f"{judge_info['cached']} from the cache")
    return out
