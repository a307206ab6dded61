"""`mose ...`: a thin command line over the library."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from mose.recipes_cli import recipes_app

app = typer.Typer(help="Skill-by-skill Mixture-of-Experts for vision-language models.",
                  no_args_is_help=True)
world_app = typer.Typer(help="The procedural embodied world.", no_args_is_help=True)
app.add_typer(world_app, name="world")
data_app = typer.Typer(help="Benchmark data in its public formats.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(recipes_app, name="recipes")
console = Console()
# Choices typer lists in --help and checks before the command runs.
Domain = Literal["driving", "robot"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DEVICE_HELP = "where the model runs: auto (cuda if there is one, else cpu), cpu, cuda, cuda:N or mps"
DTYPE_HELP = ("the model's dtype: auto (bfloat16 on a GPU that supports it, else float32), float32, "
              "bfloat16 or float16")


@app.callback()
def _settings(debug: bool = typer.Option(False, "--debug", envvar="MOSE_DEBUG",
                                         help="show the traceback behind an error")) -> None:
    """Skill-by-skill Mixture-of-Experts for vision-language models."""
    # mose's own bars say what is happening: transformers' per-load "Loading weights" bars
    # (read from this variable when transformers is imported) stay off unless the user sets it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if debug:
        os.environ["MOSE_DEBUG"] = "1"


def fail(error: Exception) -> None:
    """Print a clear error and exit 2 (bad input); the traceback too with --debug / MOSE_DEBUG=1."""
    if os.environ.get("MOSE_DEBUG", "") not in ("", "0"):
        console.print_exception()
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)


def placement(device: str, dtype: str):
    """--device and --dtype resolved (`mose.models.device`); errors name the flags."""
    from mose.models.device import resolve_placement

    return resolve_placement(device, dtype, device_name="--device", dtype_name="--dtype")


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            weights[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--weight takes KEY=NUMBER, got {item!r}")
    return weights


@world_app.command("generate")
def world_generate(
    domain: Domain = typer.Option(..., help="which world"),
    n: int = typer.Option(..., help="number of samples"),
    seed: int = typer.Option(0, help="the samples are a function of (seed, split, index)"),
    out: Path = typer.Option(..., help="folder for SPLIT.jsonl and images/"),
    split: str = typer.Option("train", help="salts the seeds: train and test never share a scene"),
    weight: list[str] = typer.Option([], help="KEY=W relative frequency of a question kind or "
                                     "object category (repeatable); e.g. cyclist=0.05 makes it rare"),
    general: bool = typer.Option(False, help="the general kinds only (describe, locate, count, ...): "
                                 "data to pretrain a general model on, no benchmark question"),
) -> None:
    """Generate image + question + answer samples with ground-truth skills."""
    from mose.data import read_jsonl
    from mose.data.world import general_weights, generate, summary

    try:
        weights = {**(general_weights(domain) if general else {}), **parse_weights(weight)}
        path = generate(domain, n, seed, out, split, weights, progress=True)
    except ValueError as error:
        fail(error)
    counts = summary(list(read_jsonl(path)))
    console.print(f"wrote {n} samples to {path}")
    for name, counter in counts.items():
        console.print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in counter.most_common()))


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., help="CODA-LM split folder, Robo2VLM parquet file or folder, "
                               "DriveLM JSON, or sample JSONL"),
    out: Path = typer.Argument(..., help="sample-record JSONL to write"),
    format: Literal["coda-lm", "robo2vlm", "drivelm", "jsonl"] = typer.Option(..., "--format",
                                                                           help="the source's format"),
    images: Path | None = typer.Option(None, help="image root: CODA2022 for coda-lm, nuScenes for "
                                       "drivelm"),
    skip_bad: bool = typer.Option(False, help="skip bad records and count them, instead of stopping"),
) -> None:
    """Convert a public benchmark to mose's sample records."""
    from mose.data import DataError
    from mose.data.loaders import convert_dataset

    try:
        report = convert_dataset(format, src, out, images, skip_bad)
    except (ValueError, DataError) as error:
        fail(error)
    table = Table("task", "records", title=f"wrote {report.written} records to {out}")
    for task, count in report.tasks.most_common():
        table.add_row(task, str(count))
    if report.skipped:
        table.add_row("[yellow]skipped (bad)[/yellow]", str(len(report.skipped)))
    console.print(table)
    for problem in report.skipped[:5]:
        console.print(f"  [yellow]skipped:[/yellow] {problem}")


@app.command()
def annotate(
    taxonomy: str = typer.Option(..., help="built-in name or YAML path"),
    data: Path = typer.Option(..., help="sample-record JSONL to annotate"),
    out: Path = typer.Option(..., help="annotated JSONL to write"),
    rules: str | None = typer.Option(None, help="shipped rule set (coda-lm, robo2vlm, drivelm, "
                                     "world-driving, world-driving-question, world-robot) or a rules "
                                     "YAML; default: the "
                                     "shipped set matching the records' source"),
    limit: int | None = typer.Option(None, help="annotate a random subset of this many samples"),
    seed: int = typer.Option(0, help="seed of the --limit subset"),
    llm_base_url: str | None = typer.Option(None, help="OpenAI-compatible endpoint for what the "
                                            "rules leave undecided (all samples without --rules)"),
    llm_model: str | None = typer.Option(None, help="model name at that endpoint"),
    llm_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the key"),
    llm_cache: Path | None = typer.Option(None, help="reply cache (default: OUT.llm-cache.jsonl); "
                                          "a rerun asks only what is not in it"),
    llm_images: bool = typer.Option(True, help="send images (for endpoints that take them)"),
) -> None:
    """Label samples with one skill per level, and report each rule's coverage."""
    from mose.data import DataError, read_jsonl, write_jsonl
    from mose.endpoint import ChatEndpoint, EndpointError
    from mose.skills.annotate import annotate as annotate_samples
    from mose.skills.llm import LLMAnnotator
    from mose.skills.rules import RuleAnnotator
    from mose.skills.shipped import explain_sources, shipped_rules_for
    from mose.skills.taxonomy import load_taxonomy

    if (llm_base_url is None) != (llm_model is None):
        fail(ValueError("--llm-base-url and --llm-model go together"))
    try:
        samples = list(read_jsonl(data))
        if limit is not None and limit < len(samples):
            keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
            samples = [samples[i] for i in keep]
        if rules is None:  # the records' source names its shipped rule set
            rules = shipped_rules_for(samples, taxonomy)
            if rules is None and llm_base_url is None:
                raise ValueError(f"{data}: no shipped rule set matches these records (sources: "
                                 f"{explain_sources(samples)}); give --rules, --llm-base-url with "
                                 "--llm-model, or both")
            if rules is not None:
                console.print(f"no --rules given: using the shipped rule set {rules!r}, "
                              "which matches the records' source")
        rule_annotator = RuleAnnotator.load(rules, taxonomy) if rules is not None else None
        llm = None
        if llm_base_url is not None:
            llm = LLMAnnotator(
                load_taxonomy(taxonomy), ChatEndpoint(llm_base_url, llm_model, llm_key_env),
                llm_cache or out.with_name(out.name + ".llm-cache.jsonl"),
                rules=[r.describe() for r in rule_annotator.rules] if rule_annotator else (),
                send_images=llm_images)
        labelled, coverage, report = annotate_samples(samples, rule_annotator, llm, progress=True)
        write_jsonl(out, labelled)
    except (ValueError, DataError, EndpointError) as error:
        fail(error)
    if coverage is not None:
        table = Table("rule", "samples", title=f"rule coverage of {coverage.total} samples")
        for name, count in coverage.by_rule.most_common():
            table.add_row(name, str(count))
        for level, count in coverage.general.items():
            table.add_row(f"[dim]{level}: fell to general[/dim]", str(count))
        console.print(table)
    if report is not None:
        console.print(f"LLM: {report.asked} asked, {report.cached} from the cache, "
                      f"{len(report.unparsable)} unparsable (left unlabelled)")
        for sample_id, reason, reply in report.unparsable[:5]:
            console.print(f"  [yellow]unparsable[/yellow] {sample_id}: {reason}; reply {reply!r}")
    console.print(f"wrote {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="recipe YAML (see configs/)"),
    resume: bool = typer.Option(False, help="skip finished stages and continue the unfinished one "
                                "from its last checkpoint"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Run a training recipe's stages in order; KEY=VALUE arguments override the recipe.

    Example: mose train --config configs/demo.yaml stages.sft.lr=3e-4 output_dir=runs/try
    """
    from mose.data import DataError
    from mose.train import RecipeError, load_recipe
    from mose.train import train as run_recipe

    try:
        recipe = load_recipe(config, ctx.args)
        run_recipe(recipe, resume=resume, progress=progress)
    except (RecipeError, DataError, ValueError, FileNotFoundError) as error:
        fail(error)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished stages and the last checkpoint are intact; "
                      "rerun with --resume to continue")
        raise typer.Exit(130) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def estimate(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="recipe YAML (see configs/)"),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs to shard over (FSDP, ZeRO-2/3)"),
    answer_tokens: int = typer.Option(512, "--answer-tokens", min=1,
                                      help="answer tokens a sample: where the LM head and the loss run"),
) -> None:
    """Parameters and memory per GPU of each stage of a recipe; KEY=VALUE arguments override it.

    Example: mose estimate --config configs/coda-lm/mose.yaml --gpus 8
    """
    from mose.estimate import estimate_table
    from mose.train import RecipeError

    try:
        console.print(estimate_table(config, gpus, ctx.args, answer_tokens))
    except (RecipeError, ValueError, FileNotFoundError) as error:
        fail(error)


@app.command()
def predict(
    model: str = typer.Option(..., help="model directory (mose, token-MoE or dense), tiny:KIND or Hub id"),
    data: Path = typer.Option(..., help="sample-record JSONL to answer"),
    out: Path = typer.Option(..., help="predictions JSONL: {id, answer, skill_chain} per line"),
    batch_size: int = typer.Option(8, help="questions per generation batch"),
    max_new_tokens: int = typer.Option(256, help="longest answer, in tokens"),
    do_sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, help="with --do-sample"),
    top_p: float = typer.Option(1.0, help="with --do-sample"),
    seed: int = typer.Option(0, help="with --do-sample"),
    route_aware: bool = typer.Option(True, help="decode together the questions that share their skill "
                                     "route, after plain prefill batches (same answers, faster decoding)"),
    force_skills: bool = typer.Option(False, help="route each question by its record's skills, not "
                                      "the routers (MoSE; oracle routing: an upper bound that reads the "
                                      "labels)"),
    format: Literal["coda-lm"] | None = typer.Option(
        None, "--format", help="coda-lm: also write the answer files CODA-LM's evaluation reads, in "
        "OUT's folder under coda-lm/"),
    engine: Literal["torch", "vllm"] = typer.Option(
        "torch", help="torch: mose generates; vllm: mose routes, vLLM generates each question with its "
        "chain's exported adapter (LoRA-MoSE models)"),
    export: Path | None = typer.Option(None, help="with --engine vllm: a `mose export` folder to serve "
                                       "(default: the chains the questions take, exported to a "
                                       "temporary folder)"),
    engine_arg: list[str] = typer.Option([], help="with --engine vllm: KEY=VALUE passed to vllm.LLM "
                                         "(repeatable; YAML values), e.g. gpu_memory_utilization=0.8"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: Dtype = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Answer every question in one forward pass, with its skill chain; resumable."""
    from mose.data import DataError, read_jsonl
    from mose.eval.coda_lm import write_coda_lm_answers
    from mose.eval.predict import GenerationOptions
    from mose.eval.predict import predict as predict_all
    from mose.models.loading import load_for_inference
    from mose.serving.engine import EngineError

    try:
        where = placement(device, dtype)  # before any work: a missing GPU is known at once
        samples = list(read_jsonl(data))
        if engine == "vllm":
            report = _predict_with_vllm(model, samples, out, where, export, engine_arg, force_skills,
                                        batch_size, GenerationOptions(max_new_tokens, do_sample,
                                                                      temperature, top_p, seed), str(data))
        else:
            loaded, processor = load_for_inference(model, where)
            report = predict_all(loaded, processor, samples, out, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                 top_p=top_p, seed=seed, route_aware=route_aware,
                                 force_skills=force_skills, source=str(data))
        if format == "coda-lm":
            written = write_coda_lm_answers(out, samples, out.parent / "coda-lm", source=str(data))
            console.print("CODA-LM answer files: " + ", ".join(str(p) for p in written))
    except (ValueError, DataError, FileNotFoundError, EngineError) as error:
        fail(error)
    if report.generated == 0:
        console.print(f"{out} is complete already ({report.total} answers)")
    else:
        routes = f", {report.routes} distinct routes" if report.routes is not None else ""
        console.print(f"wrote {out}: {report.generated} answered ({report.samples_per_second:.1f} "
                      f"samples/s{routes} on {where}), {report.resumed} resumed")


def _predict_with_vllm(model: str, samples: list, out: Path, where, export: Path | None,
                      engine_arg: list[str], force_skills: bool, batch_size: int, options, source: str):
    from mose.serving.predict import predict_with_vllm

    if force_skills:
        raise ValueError("--force-skills routes by the records' labels inside mose's own model: use "
                         "it with --engine torch")
    return predict_with_vllm(model, samples, out, placement=where, export=export, batch_size=batch_size,
                             options=options, engine_overrides=parse_key_values(engine_arg, "--engine-arg"),
                             source=source)


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE items, each value read as YAML (numbers, booleans, lists), as recipes read overrides."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


@app.command()
def chat(
    question: str = typer.Argument(..., help="the question"),
    model: str = typer.Option(..., help="model directory, tiny:KIND or Hub id"),
    image: Path | None = typer.Option(None, help="the image the question is about"),
    max_new_tokens: int = typer.Option(256, help="longest answer, in tokens"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: Dtype = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """One answer and the skill chain that explains it."""
    from mose.data import DataError
    from mose.eval.chat import answer_one, format_chain
    from mose.models.loading import load_for_inference

    try:
        loaded, processor = load_for_inference(model, placement(device, dtype))
        answer, chain = answer_one(loaded, processor, image, question, max_new_tokens=max_new_tokens)
    except (ValueError, DataError, FileNotFoundError) as error:
        fail(error)
    console.print(f"[bold]{answer}[/bold]")
    console.print(format_chain(chain), highlight=False)


@app.command()
def score(
    bench: Literal["robo2vlm", "world", "drivelm", "coda-lm"] = typer.Argument(..., help="the benchmark"),
    pred: Path = typer.Option(..., help="predictions JSONL ({id, answer, skill_chain} per line)"),
    ref: Path = typer.Option(..., help="sample-record JSONL with the reference answers"),
    out: Path | None = typer.Option(None, help="scores JSON to write"),
    judge_model: str | None = typer.Option(None, envvar="MOSE_JUDGE_MODEL",
                                           help="coda-lm: the judge (the paper's: gpt-4o-2024-05-13)"),
    judge_base_url: str | None = typer.Option(None, envvar=["MOSE_JUDGE_BASE_URL", "OPENAI_BASE_URL"],
                                              help="coda-lm: OpenAI-compatible endpoint of the judge"),
    judge_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the key"),
    cache: Path | None = typer.Option(None, help="coda-lm: judgment cache folder (default: "
                                      "judge-cache/ beside PRED); a rerun asks only what is missing"),
    workers: int = typer.Option(8, help="coda-lm: parallel judge requests"),
    timeout: float = typer.Option(60.0, help="coda-lm: seconds per judge request"),
    protocol: Literal["mose", "official"] = typer.Option(
        "mose", help="coda-lm: mose (mose's judge prompts) or official (the official scripts' prompts, "
        "few-shot files and rating rule, read from --coda-lm-repo); published numbers need official"),
    coda_lm_repo: Path | None = typer.Option(None, help="coda-lm, --protocol official: your clone of "
                                             "github.com/DLUT-LYZ/CODA-LM (or its evaluation/ folder)"),
) -> None:
    """Score predictions on a benchmark, print a table and optionally write JSON."""
    from mose.endpoint import EndpointError
    from mose.eval.score import score as score_predictions
    from mose.eval.score import table, write_scores

    try:
        scores = score_predictions(bench, pred, ref, progress=True, judge_model=judge_model,
                                   judge_base_url=judge_base_url, api_key_env=judge_key_env,
                                   cache_dir=cache, workers=workers, timeout_s=timeout,
                                   protocol=protocol, coda_lm_repo=coda_lm_repo)
    except (ValueError, EndpointError) as error:
        fail(error)
    console.print(table(bench, scores))
    if out is not None:
        write_scores(out, scores)
        console.print(f"wrote {out}")


@app.command()
def analyze(
    model: Path = typer.Option(..., help="a converted model directory (MoSE or token MoE)"),
    out: Path = typer.Option(..., help="folder for report.html and analysis.json"),
    compare: Path | None = typer.Option(None, help="a second model directory, shown side by side"),
    data: Path | None = typer.Option(None, help="skill-labelled sample records: routing statistics "
                                     "and sample answers"),
    pred: Path | None = typer.Option(None, help="predictions of MODEL on DATA, shown with the samples"),
    scores: list[Path] = typer.Option([], help="scores JSON from mose score (repeatable)"),
    max_samples: int = typer.Option(8, help="sample answers shown in the report"),
    batch_size: int = typer.Option(8, help="batch size of the routing pass"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: Dtype = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Expert diversity, routing statistics (router accuracy beside its probe ceiling), an HTML report."""
    from rich.markup import escape

    from mose.data import DataError
    from mose.eval.analyze import run_analysis
    from mose.eval.report import cell, routing_table

    try:
        where = placement(device, dtype)
        run = run_analysis(model, out, compare_dir=compare, data=data, predictions=pred,
                           scores=scores, max_samples=max_samples, batch_size=batch_size,
                           device=where.device, dtype=where.dtype)
    except (ValueError, DataError, FileNotFoundError) as error:
        fail(error)
    for analysis in run.models:
        if analysis.routing is None:
            continue
        routing = routing_table(analysis.routing)
        table = Table(routing.label, *routing.columns, title=escape(f"{analysis.name}: {routing.title}"))
        for label, cells in routing.rows:
            table.add_row(label, *map(cell, cells))
        console.print(table)
    console.print(f"wrote {run.report} and {run.report.with_name('analysis.json')}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="folder for data, models, results.json and report.html"),
    quick: bool = typer.Option(False, help="a smaller run (under 2 minutes on 2 CPU cores) that checks "
                               "the pipeline; its numbers mean little"),
) -> None:
    """The main job end to end: pretrain a tiny Qwen2-VL, train MoSE and two baselines, compare them.

    Reruns reuse finished stages and predictions.
    """
    from mose.data import DataError
    from mose.demo import DEFAULT, QUICK, run_demo
    from mose.train import RecipeError

    try:
        run_demo(out, QUICK if quick else DEFAULT)
    except (RecipeError, DataError, ValueError, FileNotFoundError) as error:
        fail(error)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished stages are kept; rerun to continue")
        raise typer.Exit(130) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def study(
    ctx: typer.Context,
    config: list[Path] = typer.Option(..., "--config", help="study YAML (see configs/study/); "
                                      "repeatable, and a shell glob's further files are taken too"),
) -> None:
    """Run the paper's experiments as studies: methods over seeds, mean ± spread, a report each.

    KEY=VALUE arguments override every study given, e.g. seeds=[0] or output_dir=runs/try.
    Examples: mose study --config configs/study/*.yaml
              mose study --config configs/study/driving.yaml seeds=[0,1] experiments.data_size=null
    Reruns reuse data, the pretrained model and finished runs.
    """
    from mose.data import DataError
    from mose.study import load_study, run_study
    from mose.train import RecipeError

    overrides = [a for a in ctx.args if "=" in a]
    paths = [*config, *(Path(a) for a in ctx.args if "=" not in a)]  # `--config a.yaml b.yaml` (a glob)
    try:
        studies = [load_study(path, overrides) for path in paths]  # every config checked before any work
        folders = [Path(s.output_dir).resolve() for s in studies]
        shared = next((f for f in folders if folders.count(f) > 1), None)
        if shared is not None:
            raise ValueError(f"two studies would write to {shared}: give each its own output_dir")
        for loaded in studies:
            run_study(loaded)
    except (RecipeError, DataError, ValueError, FileNotFoundError) as error:
        fail(error)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished runs are kept; rerun to continue")
        raise typer.Exit(130) from None


@app.command()
def taxonomy(name: str = typer.Argument("driving", help="built-in name or YAML path")) -> None:
    """Show a skill taxonomy: its levels, in order, and their skills."""
    from mose.skills.taxonomy import load_taxonomy

    try:
        loaded = load_taxonomy(name)
    except ValueError as error:
        fail(error)
    tree = Tree(f"[bold]{loaded.name}[/bold]")
    for level in loaded.levels:
        branch = tree.add(f"[cyan]{level.name}[/cyan]")
        for skill, description in zip(level.skills, level.descriptions, strict=True):
            branch.add(f"{skill}: {description}" if description else skill)
    console.print(tree)


@app.command()
def version() -> None:
    """Print mose's version."""
    from mose import __version__

    console.print(__version__)


@app.command()
def env() -> None:
    """Versions, devices and dtype support: paste it into a bug report."""
    from mose.env import environment

    table = Table("", "", show_header=False, title="mose env")
    for name, value in environment().items():
        table.add_row(name, value)
    console.print(table)


@app.command("export")
def export_command(
    model: Path = typer.Option(..., help="a converted MoSE model directory"),
    out: Path = typer.Option(..., help="folder to write (manifest.json, routers, base/, adapters/; "
                             "with --merge: the merged checkpoint)"),
    chain: list[str] = typer.Option([], help="LEVEL=SKILL,... one chain to export (repeatable; levels "
                                     "left out are general); default: every chain the model can choose"),
    merge: str | None = typer.Option(None, help="LEVEL=SKILL,...: write this one chain merged into a "
                                     "plain dense checkpoint instead of adapters"),
    base: bool = typer.Option(True, "--base/--no-base", help="also write the dense base the adapters "
                              "apply to (OUT/base)"),
    base_name: str | None = typer.Option(None, help="what the adapters' configs name as their base "
                                         "(base_model_name_or_path: a Hub id or the path an engine "
                                         "loads it from); default: OUT/base's absolute path"),
    dtype: Literal["float32", "bfloat16", "float16"] | None = typer.Option(
        None, help="write the adapters and the base (or the merged checkpoint) in this dtype; default: "
        "the model's own. The routers stay float32"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
) -> None:
    """Per-chain PEFT LoRA adapters of a MoSE model for multi-LoRA serving, or one chain merged."""
    from mose.export import check_exportable, export_adapters, export_merged, parse_chain
    from mose.models.device import DTYPES
    from mose.models.loading import is_converted, load_model, model_type_of

    try:
        if merge is not None and chain:
            raise ValueError("--merge writes one chain: give it alone, without --chain")
        cast = DTYPES[dtype] if dtype else None
        if not is_converted(model_type_of(str(model))):
            raise ValueError(f"{model}: not a converted mose model directory (its config.json's "
                             "model_type does not start with mose_)")
        loaded, processor = load_model(str(model))
        taxonomy = check_exportable(loaded, merge=merge is not None).taxonomy
        if merge is not None:
            path = export_merged(loaded, out, parse_chain(merge, taxonomy), processor=processor,
                                 dtype=cast, overwrite=overwrite)
            console.print(f"wrote {path}: a dense {loaded.mose_arch.model_class.__name__} with the "
                          "chain's deltas merged in")
            return
        chains = [parse_chain(c, taxonomy) for c in chain] or None  # None: every chain
        manifest = export_adapters(loaded, out, chains, processor=processor, with_base=base,
                                   base_name=base_name, dtype=cast, overwrite=overwrite, progress=True)
    except (ValueError, FileNotFoundError, OSError) as error:
        fail(error)
    lora = manifest["lora"]
    console.print(f"wrote {len(manifest['chains'])} adapters (rank {lora['r']}, lora_alpha "
                  f"{lora['lora_alpha']}) to {out / 'adapters'}, the manifest {out / 'manifest.json'}"
                  + (f" and the dense base {out / 'base'}" if base else ""))


@app.command()
def serve(
    model: str = typer.Option(..., help="a converted LoRA-MoSE model directory: its routers route"),
    export: Path | None = typer.Option(None, help="its `mose export` folder (the backend's adapters); "
                                       "default: every chain exported to a temporary folder"),
    backend: str | None = typer.Option(None, help="URL of a running vLLM OpenAI server holding the "
                                       "export's adapters; default: start one on --backend-port"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    backend_port: int = typer.Option(8001, help="port of the vLLM server mose starts (without --backend)"),
    backend_timeout: float = typer.Option(300.0, help="seconds a backend answer may take (else 504)"),
    max_concurrency: int = typer.Option(32, help="requests at the backend at once; more wait their turn"),
    max_batch: int = typer.Option(16, help="requests routed in one batch at most"),
    batch_window_ms: float = typer.Option(10.0, help="how long a request waits for others to route with"),
    engine_arg: list[str] = typer.Option([], help="KEY=VALUE for the vLLM server mose starts "
                                         "(repeatable), e.g. gpu_memory_utilization=0.5"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: Dtype = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """An OpenAI-compatible /v1/chat/completions that routes each request and answers with its
    chain's adapter on a vLLM server; the skill chain comes back in the `mose` field."""
    from mose.export import ExportError
    from mose.serving.backend import BackendError
    from mose.serving.engine import EngineError
    from mose.serving.launch import run_server

    try:
        run_server(model, export=export, backend=backend, host=host, port=port, backend_port=backend_port,
                   backend_timeout=backend_timeout, max_concurrency=max_concurrency, max_batch=max_batch,
                   batch_window_s=batch_window_ms / 1000, engine_overrides=parse_key_values(engine_arg,
                                                                                           "--engine-arg"),
                   where=placement(device, dtype), say=console.print)
    except (ValueError, FileNotFoundError, ImportError, ExportError, EngineError, BackendError) as error:
        fail(error)


@app.command()
def route(
    model: str = typer.Option(..., help="a converted MoSE model directory"),
    data: Path = typer.Option(..., help="sample-record JSONL to route"),
    out: Path | None = typer.Option(None, help="JSONL to write: {id, skill_chain, adapter, exact} per line"),
    manifest: Path | None = typer.Option(None, help="a `mose export` folder: adapters it lacks show as none"),
    batch_size: int = typer.Option(8, help="batch size of the routing pass"),
    show: int = typer.Option(20, help="records printed (all are written to --out)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: Dtype = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """The routing pass alone: each record's skill chain and the exported adapter it maps to."""
    import json
    from collections import Counter

    from mose.data import DataError, read_jsonl
    from mose.export import read_manifest, route_records
    from mose.models.loading import load_for_inference

    try:
        where = placement(device, dtype)
        samples = list(read_jsonl(data))
        exported = read_manifest(manifest) if manifest is not None else None
        loaded, processor = load_for_inference(model, where)
        rows = route_records(loaded, processor, samples, manifest=exported, batch_size=batch_size,
                             progress=True, source=str(data))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
            tmp.replace(out)
    except (ValueError, DataError, FileNotFoundError) as error:
        fail(error)
    table = Table("id", "skill chain", "adapter", "exact", title=f"routes of {len(rows)} records")
    for row in rows[:show]:
        table.add_row(str(row["id"]), " → ".join(row["skill_chain"].values()),
                      row["adapter"] or "[yellow]not exported[/yellow]", "yes" if row["exact"] else "no")
    console.print(table)
    counts = Counter(row["adapter"] for row in rows)
    console.print(f"{len(counts)} adapters used; " + ", ".join(f"{k}: {v}" for k, v in counts.most_common(5)))
    inexact = sum(not row["exact"] for row in rows)
    if inexact:
        console.print(f"[yellow]{inexact} record(s) not exact[/yellow]: top-k > 1, or a level's layers chose "
                      "different skills, so the chain's adapter only approximates the MoSE model there")
    missing = sum(row["adapter"] is None for row in rows)
    if missing:
        console.print(f"[yellow]{missing} record(s) map to chains not in {manifest}[/yellow]")
    if out is not None:
        console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
