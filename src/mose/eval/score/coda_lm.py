"""CODA-LM: the text-only LLM judge for general perception, region perception and suggestion.

Two protocols (`JudgeSettings.protocol`):

- "mose" (the default): mose's own prompts, after the benchmark's description
  (`benchmarks.md`): the judge reads the reference and the prediction, each
  between begin/end markers, never the image, and ends its reply with
  `Rating: [[n]]`, 1..10. General perception and driving suggestion get a
  system prompt on what to weigh and two few-shot examples (one graded high,
  one low); region perception is zero-shot. The rating is the last
  `Rating: [[n]]` (else the last `[[n]]`), 1..10; a reply without one is asked
  again (`parse_retries`).
- "official": each request is the one the official evaluation scripts send,
  built from the system prompts, template and few-shot files read at run time
  from the user's clone of the CODA-LM repository (`coda_lm_repo`, see
  `coda_lm_official`); replies are parsed by the scripts' rule (the first
  `Rating: [[n]]`, an integer; `parse_official_rating`) and asked once.

Temperature 0 in both. A task's score is the plain mean of its ratings and
`score_x10` the same times ten, the way papers print it. Region perception is
broken down by the official stage-3 script's seven classes (`OFFICIAL_CLASSES`,
by exact category name); its score, like the official one, is the mean over
the regions in those classes. Regions of any other category are reported apart
(`unlisted`), beside mose's `inclusive` total over every region. A judgment
that fails (the endpoint still erring after its retries, or a reply with no
rating) is counted in `failed`, listed in `failures`, and left out of the mean:
never dropped silently, where the official scripts drop it.

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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, TextColumn
from rich.table import Table

from mose.endpoint import ChatEndpoint, EndpointError
from mose.eval.score.coda_lm_official import load_official, parse_official_rating
from mose.eval.score.common import Pair, ScoreError, fmt, require_answer

# sample task (as the CODA-LM loader writes it) → the name scores use
TASKS = {"general_perception": "general", "region_perception": "region", "driving_suggestion": "suggestion"}
PROTOCOLS = ("mose", "official")
# The official stage-3 script's classes: a region's `category_name` is looked up, exactly as
# written, in these lists; a name in none of them is in no class and out of the stage-3 score.
OFFICIAL_CLASSES: dict[str, tuple[str, ...]] = {
    "vehicle": ("car", "truck", "tram", "tricycle", "bus", "trailer", "construction_vehicle",
                "recreational_vehicle"),
    "vru": ("pedestrian", "cyclist", "bicycle", "moped", "motorcycle", "stroller", "wheelchair", "cart"),
    "traffic_sign": ("warning_sign", "traffic_sign"),
    "traffic_light": ("traffic_light",),
    "traffic_cone": ("traffic_cone",),
    "barrier": ("barrier", "bollard"),
    "miscellaneous": ("dog", "cat", "sentry_box", "traffic_box", "traffic_island", "debris",
                      "suitcace",  # sic: the official list's spelling; "suitcase" is in no class
                      "dustbin", "concrete_block", "machinery", "chair", "phone_booth", "basket",
                      "cardboard", "carton", "garbage", "garbage_bag", "plastic_bag", "stone", "tire",
                      "misc"),
}
CLASSES = tuple(OFFICIAL_CLASSES)
_CLASS_OF = {name: cls for cls, names in OFFICIAL_CLASSES.items() for name in names}
NO_CATEGORY = "<no category>"  # how a region without `meta.category` is named among the unlisted
FATAL_STATUS = (401, 403, 404)  # wrong key, no access, unknown model: every sample would fail


def region_class(category: Any) -> str | None:
    """The official class of a CODA category name, or None for a name in no list (and for no name).

    Exact match, as the official script does it: "Traffic Cone" and "van" are in no class.
    """
    return _CLASS_OF.get(category) if isinstance(category, str) else None


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

Parser = Callable[[str], float]


@dataclass
class JudgeSettings:
    """Where and how to ask the judge. The key is read from the environment variable named.

    `protocol` "mose" asks with mose's prompts; "official" with the official scripts' own,
    read from `coda_lm_repo` (a clone of the CODA-LM repository), and parses by their rule.
    """

    model: str
    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str | Path = "runs/judge-cache"
    workers: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4  # per request, transient failures (connection, timeout, 429, 5xx)
    backoff_s: float = 1.0  # first wait; doubles each retry
    parse_retries: int = 1  # asks again when a reply has no rating (protocol mose only)
    abort_after: int = 20  # consecutive endpoint failures, no success between: the endpoint is down
    protocol: str = "mose"
    coda_lm_repo: str | Path | None = None

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
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"judge protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if self.protocol == "official" and not self.coda_lm_repo:
            raise ValueError("protocol official reads the official prompts from your clone of the "
                             "CODA-LM repository: give coda_lm_repo (--coda-lm-repo DIR)")
        if self.protocol == "mose" and self.coda_lm_repo:
            raise ValueError("coda_lm_repo is read by protocol official only; add protocol official "
                             "(--protocol official) or leave coda_lm_repo out")

    def endpoint(self) -> ChatEndpoint:
        # The official scripts send temperature=0 (an int): so does protocol official, byte for byte.
        return ChatEndpoint(self.base_url, self.model, api_key_env=self.api_key_env,
                            max_retries=self.max_retries, backoff_s=self.backoff_s,
                            timeout_s=self.timeout_s, temperature=0 if self.protocol == "official" else 0.0)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) / "judgments.jsonl"


def cache_key(model: str, messages: list[dict[str, Any]]) -> str:
    """Same judge model and same full prompt → same reply (the two protocols' prompts differ)."""
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()


def load_cache(path: Path, parse: Parser = parse_rating) -> dict[str, str]:
    """key → reply of every cached judgment whose reply parses (by the protocol's rule)."""
    cache: dict[str, str] = {}
    if not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            parse(entry["reply"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line torn by an interruption: that sample is asked again
        cache[entry["key"]] = entry["reply"]
    return cache


@dataclass
class Outcome:
    rating: float | None
    reason: str | None = None  # why it failed
    endpoint_failed: bool = False


def _ask(endpoint: ChatEndpoint, messages: list[dict[str, Any]], parse_retries: int,
         parse: Parser) -> tuple[Outcome, str]:
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
            return Outcome(parse(reply)), reply
        except ValueError as error:  # UnparsableRating, UnparsableOfficialRating
            problem = str(error)
    return Outcome(None, f"unparsable reply ({problem}): {reply[:120]!r}"), reply


@dataclass
class JudgeReport:
    asked: int = 0
    cached: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # sample id → outcome


def judge(items: list[tuple[str, list[dict[str, Any]]]], settings: JudgeSettings,
          progress: bool = False, parse: Parser | None = None) -> JudgeReport:
    """Rate every (sample id, messages): from the cache, else by the endpoint in a thread pool.

    `parse` defaults to the protocol's rule; protocol official asks once per sample, as the
    official scripts do (an unparsable reply is counted as failed, not asked again).
    """
    official = settings.protocol == "official"
    parse = parse or (parse_official_rating if official else parse_rating)
    parse_retries = 0 if official else settings.parse_retries
    path = settings.cache_path
    cache = load_cache(path, parse)
    report = JudgeReport()
    todo = []
    for sample_id, messages in items:
        key = cache_key(settings.model, messages)
        if key in cache:
            report.outcomes[sample_id] = Outcome(parse(cache[key]))
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
                pool.submit(_ask, endpoint, messages, parse_retries, parse): (sample_id, key)
                for sample_id, key, messages in todo}
            failed = down = 0
            for future in as_completed(futures):
                sample_id, key = futures[future]
                outcome, reply = future.result()
                report.asked += 1
                report.outcomes[sample_id] = outcome
                if outcome.rating is not None:
                    log.write(json.dumps({"key": key, "id": sample_id, "model": settings.model,
                                          "protocol": settings.protocol, "rating": outcome.rating,
                                          "reply": reply}) + "\n")
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
    region also "by_class", "unlisted" and "inclusive"; "average" when all three are present;
    "judge": the judge model, the protocol (and for official where its prompts were read),
    judgments asked / cached.

    Region "score" is the official stage-3 total: the mean over the regions whose category is
    in one of the seven official classes. Regions of any other category ("van", "suitcase",
    none) are judged too, but reported apart in "unlisted" (n, failed, score, names with their
    counts) and kept out of the classes, the region score and the average; "inclusive" is
    mose's total over every region, for reading beside it.
    """
    official = load_official(settings.coda_lm_repo) if settings.protocol == "official" else None
    build = official.messages if official else judge_messages
    items, tasks = [], {}
    for pair in pairs:
        sample = pair.sample
        if sample.task not in TASKS:
            raise ScoreError(f"reference {sample.id!r}, field 'task': {sample.task!r} is not a CODA-LM "
                             f"task ({', '.join(TASKS)})")
        tasks[sample.id] = TASKS[sample.task]
        items.append((sample.id, build(TASKS[sample.task], require_answer(pair), pair.prediction.answer)))
    report = judge(items, settings, progress)
    check_range = official is not None  # the official rule takes any integer; say how many left 1..10
    by_task: dict[str, list[str]] = defaultdict(list)
    for sample_id, task in tasks.items():
        by_task[task].append(sample_id)
    result: dict[str, Any] = {}
    for task in ("general", "suggestion"):
        if task in by_task:
            result[task] = _summary(by_task[task], report.outcomes, check_range=check_range)
    if "region" in by_task:
        classes: dict[str, list[str]] = {c: [] for c in CLASSES}
        unlisted: dict[str, list[str]] = defaultdict(list)
        for pair in pairs:
            if tasks[pair.sample.id] == "region":
                category = pair.sample.meta.get("category")
                cls = region_class(category)
                if cls is None:
                    unlisted[category if isinstance(category, str) else NO_CATEGORY].append(pair.sample.id)
                else:
                    classes[cls].append(pair.sample.id)
        listed = [i for ids in classes.values() for i in ids]
        others = [i for ids in unlisted.values() for i in ids]
        region = _summary(listed, report.outcomes, check_range=check_range)
        region["by_class"] = {c: _summary(ids, report.outcomes, failures=False) for c, ids in classes.items()}
        region["unlisted"] = {**_summary(others, report.outcomes, check_range=check_range),
                              "names": {name: len(ids) for name, ids in sorted(unlisted.items())}}
        region["inclusive"] = {**_summary(by_task["region"], report.outcomes, failures=False),
                               "note": "mose's total over every region, unlisted ones included; "
                                       "not the official stage-3 score"}
        result["region"] = region
    result = {task: result[task] for task in ("general", "region", "suggestion") if task in result}
    scored = [result[t]["score"] for t in ("general", "region", "suggestion") if t in result]
    if len(scored) == 3 and None not in scored:
        mean = statistics.fmean(scored)
        result["average"] = {"score": round(mean, 4), "score_x10": round(10 * mean, 4)}
    result["judge"] = {"model": settings.model, "protocol": settings.protocol,
                       **(official.describe() if official else {}),
                       "asked": report.asked, "cached": report.cached}
    return result


def _summary(ids: list[str], outcomes: dict[str, Outcome], failures: bool = True,
             check_range: bool = False) -> dict[str, Any]:
    ratings = [outcomes[i].rating for i in ids if outcomes[i].rating is not None]
    mean = statistics.fmean(ratings) if ratings else None
    out: dict[str, Any] = {"score": None if mean is None else round(mean, 4),
                           "score_x10": None if mean is None else round(10 * mean, 4),
                           "n": len(ids), "failed": len(ids) - len(ratings)}
    if check_range:
        out["outside_1_10"] = sum(not 1 <= r <= 10 for r in ratings)  # counted in the mean, as officially
    if failures:
        failed = [{"id": i, "reason": outcomes[i].reason} for i in ids if outcomes[i].rating is None]
        out["failures"] = failed[:20]  # the count is in "failed"; these are examples
    return out


def table(scores: dict[str, Any], title: str | None = None) -> Table:
    judge_info = scores.get("judge") or {}
    protocol = judge_info.get("protocol", "mose")
    out = Table("task", "score (1..10)", "×10", "n", "failed",
                title=title or f"CODA-LM (LLM judge {judge_info.get('model', '?')}, protocol {protocol})")

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
        region = scores["region"]
        out.add_section()
        for name, cell in region["by_class"].items():
            row(f"  region: {name}", cell)
        if region.get("unlisted", {}).get("n"):  # otherwise the inclusive total is the region score
            out.add_section()
            row("  region: unlisted (in no class, not scored)", region["unlisted"])
            row("  region: all regions (mose, inclusive)", region["inclusive"])
    if judge_info:
        source = f", prompts from {judge_info['coda_lm_repo']}" if "coda_lm_repo" in judge_info else ""
        caption = (f"judge {judge_info['model']}, protocol {protocol}{source}: {judge_info['asked']} asked, "
                   f"{judge_info['cached']} from the cache")
        unlisted = scores.get("region", {}).get("unlisted", {}).get("names")
        if unlisted:
            caption += "\nunlisted region categories: " + ", ".join(f"{k} ×{v}" for k, v in unlisted.items())
        outside = sum(scores[t].get("outside_1_10", 0) for t in ("general", "region", "suggestion")
                      if t in scores)
        if outside:
            caption += f"\n{outside} rating(s) outside 1..10, counted as the official rule does"
        out.caption = caption
    return out
