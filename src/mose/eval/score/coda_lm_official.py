"""CODA-LM's official judge requests, read at run time from the user's clone of its repository.

mose ships none of the official text. `load_official(DIR)` reads, from a clone
of github.com/DLUT-LYZ/CODA-LM (DIR, or DIR's `evaluation/` folder itself):

- `evaluation/stage1_eval_batch.py` (general perception),
  `evaluation/stage2_eval_batch.py` (driving suggestion),
  `evaluation/stage3_eval_batch.py` (region perception): each script's system
  prompt (the one string constant assigned to `self.system_prompt`), its
  reference/prediction template (the string constant assigned to `template`,
  filled as `template.format(reference, prediction)`) and the name of its
  few-shot folder (the last string argument of the `os.path.join(...)`
  assigned to `few_shot`; stage 3 has none: zero-shot). The scripts are parsed
  (`ast`), never run.
- `evaluation/<few-shot folder>/high.json` then `low.json`, each
  `{"reference", "prediction", "response"}`: stages 1 and 2 send them as a user
  turn (the template filled with reference and prediction) and an assistant
  turn (the response), high first.

A request is then [system, (user, assistant) per example, user], as the
scripts build it. Replies are parsed by the scripts' rule
(`parse_official_rating`).
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mose.eval.score.common import ScoreError

REPOSITORY = "https://github.com/DLUT-LYZ/CODA-LM"
SCRIPTS = {"general": "stage1_eval_batch.py", "suggestion": "stage2_eval_batch.py",
           "region": "stage3_eval_batch.py"}
FEW_SHOT_FILES = ("high.json", "low.json")  # the order the scripts send them in
FEW_SHOT_KEYS = ("reference", "prediction", "response")
# The markers the scripts try in turn: the text after the first one, up to "]]", read by int().
_MARKERS = ("Rating: [[", "rating is: [[", "[[")


class CodaLmRepoError(ScoreError):
    """The folder given as the CODA-LM clone does not hold what the official scripts hold."""


class UnparsableOfficialRating(ValueError):
    pass


def parse_official_rating(reply: str) -> int:
    """The official scripts' rule: `int()` of the text between the first "Rating: [[" and the
    next "]]"; failing that, the same after "rating is: [[", then after the first "[[".

    No range check, as in the scripts (an 11 counts as 11). Where every try fails the
    scripts drop the sample; mose raises, and the judgment is counted as failed.
    """
    for marker in _MARKERS:
        try:
            return int(reply.split(marker)[1].split("]]")[0])
        except (IndexError, ValueError):
            continue
    raise UnparsableOfficialRating("no rating by the official rule (Rating: [[n]], rating is: [[n]], "
                                   "[[n]]; n an integer)")


@dataclass(frozen=True)
class Stage:
    script: Path
    system: str
    template: str
    few_shot: tuple[tuple[str, str, str], ...]  # (reference, prediction, response), high then low


@dataclass(frozen=True)
class OfficialPrompts:
    """What the three official scripts send, read from one clone."""

    folder: Path  # the clone's evaluation/ folder
    stages: dict[str, Stage]  # general, suggestion, region
    sources: dict[str, str]  # file read (relative to the clone) → sha256

    def messages(self, task: str, reference: str, prediction: str) -> list[dict[str, Any]]:
        """The chat messages the official script of `task` sends for one sample."""
        stage = self.stages[task]
        messages: list[dict[str, Any]] = [{"role": "system", "content": stage.system}]
        for example_reference, example_prediction, response in stage.few_shot:
            messages += [{"role": "user", "content": stage.template.format(example_reference,
                                                                           example_prediction)},
                         {"role": "assistant", "content": response}]
        messages.append({"role": "user", "content": stage.template.format(reference, prediction)})
        return messages

    def describe(self) -> dict[str, Any]:
        """For the score file: where the requests came from."""
        return {"coda_lm_repo": str(self.folder.parent), "sources": dict(self.sources)}


def load_official(repo: str | Path) -> OfficialPrompts:
    """Read the official prompts and few-shot examples from a CODA-LM clone (see the module doc)."""
    root = Path(repo).expanduser()
    if not root.is_dir():
        raise CodaLmRepoError(f"coda_lm_repo {root}: not a folder; give your clone of {REPOSITORY}")
    folder = root if (root / SCRIPTS["general"]).is_file() and not (root / "evaluation").is_dir() \
        else root / "evaluation"
    sources: dict[str, str] = {}
    stages = {}
    for task, name in SCRIPTS.items():
        script = folder / name
        if not script.is_file():
            raise CodaLmRepoError(f"coda_lm_repo {root}: missing {_rel(script, root)} (the official "
                                  f"{task} judge script); expected a clone of {REPOSITORY}")
        source = script.read_bytes()
        sources[_rel(script, folder.parent)] = hashlib.sha256(source).hexdigest()
        system, template, few_shot_dir = _read_script(script, source)
        examples = []
        if few_shot_dir is not None:
            for file_name in FEW_SHOT_FILES:
                path = folder / few_shot_dir / file_name
                examples.append(_read_example(path, root, script))
                sources[_rel(path, folder.parent)] = hashlib.sha256(path.read_bytes()).hexdigest()
        stages[task] = Stage(script, system, template, tuple(examples))
    return OfficialPrompts(folder, stages, sources)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_script(script: Path, source: bytes) -> tuple[str, str, str | None]:
    """(system prompt, template, few-shot folder name or None) of one official script."""
    try:
        tree = ast.parse(source, filename=str(script))
    except SyntaxError as error:
        raise CodaLmRepoError(f"{script}: not readable as Python ({error.msg}, "
                              f"line {error.lineno})") from None
    systems, templates, few_shots = [], [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        if (isinstance(target, ast.Attribute) and target.attr == "system_prompt"
                and isinstance(target.value, ast.Name) and target.value.id == "self" and _is_str(value)):
            systems.append(value.value)
        elif isinstance(target, ast.Name) and target.id == "template" and _is_str(value):
            templates.append(value.value)
        elif isinstance(target, ast.Name) and target.id == "few_shot":
            last = value.args[-1] if isinstance(value, ast.Call) and value.args else None
            if not _is_str(last):
                raise CodaLmRepoError(f"{script}, line {node.lineno}: `few_shot` is not "
                                      "os.path.join(..., \"<folder>\"); is this the official script?")
            few_shots.append(last.value)
    system = _one(systems, script, 'a string assigned to `self.system_prompt`')
    template = _one(templates, script, 'a string assigned to `template`')
    try:
        template.format("", "")
    except (IndexError, KeyError, ValueError) as error:
        raise CodaLmRepoError(f"{script}: its `template` does not take (reference, prediction) "
                              f"as two {{}} fields: {error}") from None
    few_shot = _one(few_shots, script, "`few_shot` folder") if few_shots else None
    return system, template, few_shot


def _is_str(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _one(found: list[str], script: Path, what: str) -> str:
    if not found:
        raise CodaLmRepoError(f"{script}: no {what} found; is this the official CODA-LM script?")
    if len(set(found)) > 1:
        raise CodaLmRepoError(f"{script}: {len(set(found))} different values for {what}; "
                              "expected one, as in the official script")
    return found[0]


def _read_example(path: Path, root: Path, script: Path) -> tuple[str, str, str]:
    if not path.is_file():
        raise CodaLmRepoError(f"coda_lm_repo {root}: missing {_rel(path, root)} (a few-shot example "
                              f"{script.name} sends); expected a clone of {REPOSITORY}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CodaLmRepoError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(data, dict):
        raise CodaLmRepoError(f"{path}: expected an object with {', '.join(FEW_SHOT_KEYS)}")
    for key in FEW_SHOT_KEYS:
        if not isinstance(data.get(key), str):
            raise CodaLmRepoError(f"{path}, field {key!r}: expected a string, got {data.get(key)!r}")
    return data["reference"], data["prediction"], data["response"]
