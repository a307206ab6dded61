"""Answers with their skill chains: batched, resumable generation over sample records.

Every question gets one forward pass (no multi-round dialogue) on the prompt
training built (`SampleEncoder`, left-padded), and its route is decided once
on that prompt. The predictions file holds one JSON object per line,
`{"id", "answer", "skill_chain"}`, in input order; `skill_chain` maps each
level to `{"skill", "prob"}` for a MoSE model and is null for a dense or a
token-MoE model.

`force_skills=True` routes every question by its own labelled chain (the
record's `skills`, a missing level being `general`) instead of the routers:
oracle routing, an upper bound that reads the labels. The chains written are
then the labels.

Resuming: results are appended to `OUT.partial` after every batch; a rerun
skips the ids found there (a torn last line, as a kill leaves it, is dropped)
and, once every id is answered, the records are written to OUT in input order
and the partial file removed. So OUT exists only when complete.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from transformers import GenerationConfig

from mose.data.collate import Collator, SampleEncoder
from mose.data.schema import DataError, Sample, atomic_path
from mose.eval.batching import check_batch_size, is_mose, plain_batches
from mose.eval.predictions import Prediction, chain_dict, parse_prediction, read_predictions
from mose.eval.regroup import RouteGroupDecoder
from mose.models.device import model_device, to_device
from mose.routing import SkillChain
from mose.skills.taxonomy import Taxonomy

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class GenerationOptions:
    """How answers are decoded: greedy by default, or sampled with temperature and top-p."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        # Explicit values override a checkpoint's generation_config (Qwen2-VL ships
        # do_sample with top_k=1): greedy means greedy, sampling means these settings.
        if not self.do_sample:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False,
                        temperature=None, top_p=None, top_k=None)
        return dict(max_new_tokens=self.max_new_tokens, do_sample=True,
                    temperature=self.temperature, top_p=self.top_p, top_k=None)

    def vllm_kwargs(self) -> dict[str, Any]:
        """The same options as `vllm.SamplingParams` arguments (greedy: temperature 0)."""
        if not self.do_sample:
            return {"max_tokens": self.max_new_tokens, "temperature": 0.0}
        return {"max_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed}


class Answerer:
    """Encodes samples as training does, generates a batch, decodes it with its skill chains."""

    def __init__(self, model: Any, processor: Any, options: GenerationOptions | None = None,
                 source: str = "samples", force_skills: bool = False) -> None:
        """`source` (the data file, say) is what error messages name as the file.

        `force_skills`: route by each sample's labelled skills (MoSE only; see `predict`).
        """
        self.model = model
        self.options = options or GenerationOptions()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.mose = is_mose(model)
        if force_skills and not self.mose:
            raise ValueError(f"force_skills routes by skill labels, which only a MoSE model has; "
                             f"{type(model).__name__} is not one")
        self.force_skills = force_skills
        # With a taxonomy the encoder adds each sample's skill labels, (L,): the forced routes.
        taxonomy = model.mose_config.taxonomy if force_skills else None
        self.encoder = SampleEncoder(processor, taxonomy=taxonomy, source=source)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.tokenizer.eos_token_id if pad is None else pad
        self.collate = Collator(self.pad_token_id, padding_side="left")

    def inputs(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The left-padded prompts of a batch, on the model's device (images loaded here);
        with `force_skills`, also their `skill_labels` (B, L), which the model routes by."""
        if self.force_skills:
            check_skill_labels(samples, self.model.mose_config.taxonomy, self.encoder.source)
        batch = self.collate([self.encoder(s, with_answer=False) for s in samples])
        batch.pop("labels")  # all IGNORE: there is no answer in a prompt
        return to_device(batch, model_device(self.model))

    def generation_config(self) -> GenerationConfig:
        """What `generate` runs with: the checkpoint's config, updated by these options."""
        config = copy.deepcopy(self.model.generation_config)
        config.update(**self.options.generate_kwargs(), pad_token_id=self.pad_token_id)
        return config

    def regroups(self) -> bool:
        """Whether route groups can decode (`mose.eval.regroup`): a MoSE model that keeps the
        prompt's route while decoding ("running" routing changes it every step)."""
        return self.mose and self.model.mose_config.decode_routing == "once"

    def answer(self, samples: Sequence[Sample]) -> list[Prediction]:
        inputs = self.inputs(samples)
        with torch.no_grad():
            out = self.model.generate(**inputs, **self.options.generate_kwargs(),
                                      pad_token_id=self.pad_token_id)
        # Left padding ends every prompt at the same column: the rest is new tokens.
        new = out[:, inputs["input_ids"].shape[1]:].cpu()  # (B, N)
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        chains = ([chain_dict(c) for c in self.model.skill_chains()] if self.mose
                  else [None] * len(samples))
        return [Prediction(s.id, a.strip(), c) for s, a, c in zip(samples, answers, chains, strict=True)]


def check_skill_labels(samples: Iterable[Sample], taxonomy: Taxonomy, source: str = "samples") -> None:
    """Every sample labelled with skills of `taxonomy` (what forced routes need), else a DataError
    naming the file, the record and the field."""
    for sample in samples:
        if sample.skills is None:
            raise DataError(source, sample.id, "skills", "force_skills routes each question by its "
                            "labelled skill chain, and this record has none: label the file first "
                            "(mose annotate) or answer without forced routes")
        try:
            taxonomy.encode(sample.skills)
        except ValueError as error:
            raise DataError(source, sample.id, "skills", str(error)) from None


@dataclass(frozen=True)
class PredictReport:
    out_path: Path
    total: int  # samples in the input
    generated: int  # answered in this run
    resumed: int  # found in OUT.partial from an earlier run
    batches: int  # generation batches in this run (route groups: one per decode batch composition)
    routes: int | None  # distinct full routes among this run's samples (MoSE with route-aware batching)
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def partial_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + PARTIAL_SUFFIX)


def predict(model: Any, processor: Any, samples: Iterable[Sample], out_path: str | Path, *,
            batch_size: int = 8, max_new_tokens: int = 256, do_sample: bool = False,
            temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, route_aware: bool = True,
            force_skills: bool = False, progress: bool = True, source: str = "samples") -> PredictReport:
    """Answer every sample and write OUT (JSONL, input order), resuming from OUT.partial.

    Args:
        samples: sample records (`mose.data.read_jsonl`); ids must be unique.
        route_aware: MoSE models prefill plain batches (which chooses every
            prompt's route), then decode prompts that share their full route
            together, refilling a batch as its answers end (`mose.eval.regroup`),
            which keeps decoding at one skill expert per MoSE layer. Answers are
            those of plain batching; only speed changes. No effect on dense or
            token-MoE models, nor with "running" decode routing.
        seed: seeds sampling (`do_sample`); greedy decoding does not use it.
        force_skills: route every question by its record's `skills` instead of the
            routers (MoSE models only): oracle routing, an upper bound that reads
            the labels; the chains written are the labels. A record without skills
            (or with skills the model's taxonomy lacks) is a DataError before any work.
        source: the data file's name, for error messages (a missing image is a
            DataError naming file, record and field).
    Returns:
        what was done; a complete OUT is left alone (`generated == 0`).
    """
    options = GenerationOptions(max_new_tokens, do_sample, temperature, top_p, seed)
    samples = list(samples)
    check_batch_size(batch_size)  # before any work
    log = PredictionLog(out_path, samples, source)
    answerer = Answerer(model, processor, options, source, force_skills)
    if force_skills:
        check_skill_labels(samples, model.mose_config.taxonomy, source)
    begin = time.perf_counter()
    if log.complete:
        return PredictReport(log.out_path, len(samples), 0, 0, 0, None, time.perf_counter() - begin)
    todo = log.todo(samples)
    routes: int | None = None
    batches = 0
    with eval_mode(model), progress_bar(progress) as bar, log.open() as keep_all:
        if do_sample:
            torch.manual_seed(seed)
        task = bar.add_task("answering", total=len(todo))

        def keep(predictions: list[Prediction]) -> None:
            keep_all(predictions)
            bar.advance(task, len(predictions))

        if route_aware and answerer.regroups():
            routes, batches = _answer_in_route_groups(answerer, todo, batch_size, keep)
        else:
            for rows in plain_batches(len(todo), batch_size):
                keep(answerer.answer([todo[i] for i in rows]))
                batches += 1
    return PredictReport(log.out_path, len(samples), len(todo), log.resumed, batches, routes,
                         time.perf_counter() - begin)


class PredictionLog:
    """The predictions file of one run, resumable: answers are appended to OUT.partial as they
    come (a rerun skips the ids found there), and OUT is written, in input order, only once
    every id is answered."""

    def __init__(self, out_path: str | Path, samples: Sequence[Sample], source: str = "samples") -> None:
        """Checks the ids (unique) and an existing OUT (complete for these ids), before any work."""
        self.out_path, self.partial = Path(out_path), partial_path(out_path)
        self.ids = _unique_ids(samples, source)
        self.complete = self.out_path.exists()
        if self.complete:
            _check_complete(self.out_path, self.ids)
            self.partial.unlink(missing_ok=True)  # left over if a run died between rename and cleanup
        self.done = {} if self.complete else _resume(self.partial, set(self.ids))
        self.resumed = len(self.done)

    def todo(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples not answered yet, in input order."""
        return [s for s in samples if s.id not in self.done]

    @contextmanager
    def open(self) -> Iterator[Callable[[list[Prediction]], None]]:
        """A `keep(predictions)` that appends to OUT.partial; on a clean exit, OUT is written."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with self.partial.open("a", encoding="utf-8") as log:
            def keep(predictions: list[Prediction]) -> None:
                log.write("".join(p.to_json() + "\n" for p in predictions))
                log.flush()  # a kill loses at most what is being generated
                self.done.update((p.id, p) for p in predictions)

            yield keep
        _finish(self.out_path, self.partial, self.ids, self.done)


def _answer_in_route_groups(answerer: Answerer, samples: list[Sample], batch_size: int,
                            keep: Callable[[list[Prediction]], None]) -> tuple[int, int]:
    """Prefill plain batches, decode batches that share their route (`mose.eval.regroup`);
    returns (distinct routes, decode batches)."""
    decoder = RouteGroupDecoder(answerer.model, answerer.generation_config(), batch_size)

    def finished(index: int, tokens: list[int], chain: SkillChain) -> None:
        answer = answerer.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        keep([Prediction(samples[index].id, answer, chain_dict(chain))])

    def prefill_batches():
        for rows in plain_batches(len(samples), batch_size):
            yield rows, answerer.inputs([samples[i] for i in rows])

    decoder.run(prefill_batches(), finished)
    return len(decoder.routes), len(decoder.compositions)


def _unique_ids(samples: Sequence[Sample], source: str) -> list[str]:
    ids, seen = [], set()
    for sample in samples:
        if sample.id in seen:
            raise ValueError(f"{source}, record {sample.id}, field 'id': the id repeats; "
                             "predictions are keyed by id, so ids must be unique")
        seen.add(sample.id)
        ids.append(sample.id)
    return ids


def _check_complete(out_path: Path, ids: list[str]) -> None:
    have = read_predictions(out_path)
    missing = [i for i in ids if i not in have]
    if missing:
        raise ValueError(f"{out_path}: exists but lacks {len(missing)} of the {len(ids)} input ids "
                         f"(first: {missing[0]!r}); it was written for other data: remove it "
                         "or choose another output path")


def _resume(partial: Path, ids: set[str]) -> dict[str, Prediction]:
    """Predictions already in OUT.partial; a torn last line (no newline yet) is cut off."""
    if not partial.is_file():
        return {}
    data = partial.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # whole lines only: a kill may leave half a line
    if len(complete) < len(data):
        with partial.open("r+b") as handle:
            handle.truncate(len(complete))
    done: dict[str, Prediction] = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(str(partial), f"at line {number}", None, f"malformed JSON: {error}") from None
        prediction = parse_prediction(data, str(partial), f"at line {number}")
        if prediction.id not in ids:
            raise ValueError(f"{partial}, line {number}: id {prediction.id!r} is not in the input; "
                             "this partial file belongs to other data: remove it to start over")
        done[prediction.id] = prediction
    return done


def _finish(out_path: Path, partial: Path, ids: list[str], done: Mapping[str, Prediction]) -> None:
    """Write OUT in input order (atomically, so OUT exists only complete), then drop the partial."""
    with atomic_path(out_path) as temp, temp.open("w", encoding="utf-8") as out:
        out.write("".join(done[i].to_json() + "\n" for i in ids))
    partial.unlink(missing_ok=True)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, in its former mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} samples/s", style="progress.data.speed")


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled)
