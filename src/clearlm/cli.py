"""The `clearlm` command line: typer sub-commands over the pipeline, rendered with rich.

Each command imports what it uses when it runs, so `--help`, `audit`, `eval --list` and `run --plan` start
without torch (see docs/design.md)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from clearlm import __version__
from clearlm.errors import ClearlmError, InputError
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe
from clearlm.stages import Reporter
from clearlm.storage import disk_full, failed_path, free_bytes, human
from clearlm.tables import metric_rows
from clearlm.world import world

if TYPE_CHECKING:
    from clearlm.artifacts import Artifact

app = typer.Typer(
    help="Train, evaluate and release a fully open language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_state = {"debug": False}

RecipeArg = Annotated[
    str | None, typer.Argument(help="recipe TOML file, or a built-in recipe name (default: quickstart)")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a recipe value, e.g. train.max_steps=200")
]
WorkdirOpt = Annotated[Path, typer.Option(help="where artifacts are stored")]
ResumeOpt = Annotated[bool, typer.Option(help="continue an interrupted training run from its last checkpoint")]
StopOpt = Annotated[
    int | None, typer.Option(help="stop (as if interrupted) after this many steps; continue with --resume")
]


class RichReporter(Reporter):
    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None

    def stage_started(self, kind: str) -> None:
        console.print(f"[bold cyan]{kind}[/]: building")

    def stage_skipped(self, kind: str, artifact: Artifact) -> None:
        console.print(f"[bold cyan]{kind}[/]: up to date, skipped ({artifact.path})")

    def stage_finished(self, kind: str, artifact: Artifact) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        console.print(f"[bold cyan]{kind}[/]: done in {artifact.manifest['seconds']:.1f} s ({artifact.path})")

    def note(self, message: str) -> None:
        console.print(message)

    def data_progress(self, steps: dict[str, tuple[int, int]]) -> None:
        if self.progress is None:
            self.progress = Progress(TextColumn("  {task.description:<18}"), TextColumn("{task.fields[info]}"),
                                     console=console)  # fmt: skip
            self.progress.start()
            self.tasks: dict[str, Any] = {}
            self.started = time.perf_counter()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        for name, (docs, n_bytes) in steps.items():
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, info="")
            info = f"{docs:>9,} docs  {docs / elapsed:8,.0f} docs/s  {n_bytes / elapsed / 1e6:7.2f} MB/s"
            self.progress.update(self.tasks[name], info=info)

    def train_step(self, record: dict[str, Any]) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("  train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=record["max_steps"], info="")
        tokens = record.get("tokens_per_s", record.get("train_tokens_per_s", 0.0))
        info = f"loss {record['loss']:.3f}  {tokens:,.0f} tok/s" if "loss" in record else ""
        if "reward" in record:  # RL: the sampled completions' mean reward
            info = f"reward {record['reward'] or 0.0:.3f}  " + info
        if record.get("val_loss") is not None:
            info += f"  val {record['val_loss']:.3f}"
        self.progress.update(self.task, completed=record["step"], info=info)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print a ClearlmError as one line and exit 2; tracebacks only with --debug."""
    try:
        yield
    except ClearlmError as e:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as e:  # a full disk outside a stage (a lock file, a report, an export)
        if _state["debug"] or not (full := disk_full(e)):
            raise
        where = failed_path(full, Path.cwd())
        console.print(f"[red]error:[/] {where}: no space left on the device ({human(free_bytes(where))} free); "
                      "free space, then run again", highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(2) from None


def _pipeline(recipe: str | None, overrides: list[str] | None, workdir: Path, command: str = "") -> Pipeline:
    """The recipe's pipeline; under torchrun only rank 0 reports, and only `train` and `run` may run there
    (the one-process commands name themselves in `command`)."""
    if command and world().distributed:
        raise ClearlmError(f"`clearlm {command}` runs in one process; under torchrun only `train`, `run` and "
                           f"`verify` use several (run `clearlm {command}` without torchrun)")  # fmt: skip
    return Pipeline(load_recipe(recipe, overrides or []), workdir, RichReporter() if world().main else Reporter())


def _stopped(stage: str, art: Artifact | None, stop_after: int | None) -> bool:
    """True (and says how to go on) when `--stop-after` interrupted the stage before it finished."""
    if art is None:
        console.print(f"{stage}: stopped after step {stop_after}; continue with --resume")
    return art is None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clearlm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    _state["debug"] = debug


def _summary(pipe: Pipeline) -> None:
    table = Table(title="stages")
    for col in ("stage", "seconds", "artifact"):
        table.add_column(col)
    for kind, art in pipe.artifacts.items():
        table.add_row(kind, f"{art.manifest['seconds']:.1f}", str(art.path))
    console.print(table)
    if "eval" in pipe.artifacts:
        _print_bpb(pipe.artifacts["eval"].metrics)


def _print_bpb(metrics: dict[str, Any]) -> None:
    if "bits_per_byte" not in metrics:
        return
    table = Table(title="validation bits per byte")
    for col in ("domain", "bits/byte", "untrained", "documents"):
        table.add_column(col)
    untrained = metrics.get("untrained_bits_per_byte", {})
    for domain, m in metrics["bits_per_byte"].items():
        base = untrained.get(domain, {}).get("bits_per_byte")
        table.add_row(domain, f"{m['bits_per_byte']:.4f}", f"{base:.4f}" if base else "", str(m["documents"]))
    console.print(table)


@app.command()
def run(
    recipe: RecipeArg = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("runs"),
    resume: ResumeOpt = False,
    plan: Annotated[bool, typer.Option(help="print what would be built, resumed or found, and why")] = False,
) -> None:
    """Run every stage the recipe asks for (data ... release); up-to-date ones are skipped."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir, "run --plan" if plan else "")
        if plan:
            _print_plan(pipe, resume)
            return
        art = pipe.run("release", resume=resume)
        if art is None:  # a torchrun rank other than 0: it took part in training only
            return
        _summary(pipe)
        console.print(f"release: [bold]{workdir / pipe.recipe.name / 'release'}[/] -> {art.path}")


def _print_plan(pipe: Pipeline, resume: bool) -> None:
    table = Table(title=f"plan for {pipe.recipe.name} in {pipe.workdir}")
    for col in ("stage", "", "action", "why", "digest"):
        table.add_column(col)
    for entry in pipe.plan("release", resume):
        table.add_row(entry.stage, entry.label, entry.action, entry.why, entry.digest.removeprefix("sha256:")[:16])
    Console().print(table)


@app.command()
def data(recipe: RecipeArg = None, set_: SetOpt = None, workdir: WorkdirOpt = Path("runs")) -> None:
    """Build the corpus, train the tokenizer and write token shards."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir, "data")
        pipe.run("shards")
        _summary(pipe)


@app.command()
def train(
    recipe: RecipeArg = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("runs"),
    resume: ResumeOpt = False,
    stop_after: StopOpt = None,
) -> None:
    """Pretrain the model (building the data stages first if needed)."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir)
        art = pipe.run("train", resume=resume, stop_after=stop_after)
        if not world().main or _stopped("train", art, stop_after):
            return
        _summary(pipe)


@app.command()
def sft(
    recipe: RecipeArg = None, set_: SetOpt = None, workdir: WorkdirOpt = Path("runs"), resume: ResumeOpt = False,
    stop_after: StopOpt = None,
) -> None:  # fmt: skip
    """Supervised fine-tuning on chat data (the recipe's sft section), after pretraining if needed."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir, "sft")
        art = pipe.run("sft", resume=resume, stop_after=stop_after)
        if _stopped("sft", art, stop_after):
            return
        _summary(pipe)
        m = art.metrics
        console.print(f"sft: {m['examples']} examples, {m['steps']} steps, loss {m['first_loss']:.4f} -> "
                      f"{m['final_loss']:.4f}; {m['counts']} {m['bad_rows'] or ''}", highlight=False)  # fmt: skip


@app.command()
def dpo(
    recipe: RecipeArg = None, set_: SetOpt = None, workdir: WorkdirOpt = Path("runs"), resume: ResumeOpt = False,
    stop_after: StopOpt = None,
) -> None:  # fmt: skip
    """Preference tuning (the recipe's dpo section), after SFT and pretraining if needed."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir, "dpo")
        art = pipe.run("dpo", resume=resume, stop_after=stop_after)
        if _stopped("dpo", art, stop_after):
            return
        m = art.metrics
        _summary(pipe)
        before, after = m["held_out_before"], m["held_out_after"]
        nan = float("nan")
        line = (f"dpo: {m['pairs']} pairs, {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}; "
                f"held-out preference accuracy {before.get('acc', nan):.3f} -> {after.get('acc', nan):.3f} "
                f"({before.get('pairs', 0)} pairs)")  # fmt: skip
        console.print(line, highlight=False)


@app.command()
def rlvr(
    recipe: RecipeArg = None, set_: SetOpt = None, workdir: WorkdirOpt = Path("runs"), resume: ResumeOpt = False,
    stop_after: StopOpt = None,
) -> None:  # fmt: skip
    """Reinforcement learning with verifiable rewards (the recipe's rlvr section: GRPO), after what it starts from."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir, "rlvr")
        art = pipe.run("rlvr", resume=resume, stop_after=stop_after)
        if _stopped("rlvr", art, stop_after):
            return
        m = art.metrics
        _summary(pipe)
        before, after = m["held_out_before"], m["held_out_after"]
        held = (f"; held-out mean reward {before['reward']:.4f} -> {after['reward']:.4f} ({before['prompts']} prompts)"
                if before else "")  # fmt: skip
        console.print(f"rlvr: {m['prompts']} prompts, {m['steps']} steps, sampled reward {m['first_reward']:.4f} -> "
                      f"{m['final_reward']:.4f}{held}; {m['empty_completions']} empty completions, "
                      f"{m['verifier_errors']} verifier errors; {m['counts']} {m['bad_rows'] or ''}",
                      highlight=False)  # fmt: skip


@app.command("eval")
def eval_(
    target: Annotated[
        str | None, typer.Argument(help="a model folder, or a recipe (file or built-in name) to evaluate its model")
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated built-in tasks, e.g. arc_easy,piqa")] = None,
    task_file: Annotated[list[Path] | None, typer.Option(help="a task definition file (TOML or YAML)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the tasks' data files")] = None,
    bpb: Annotated[list[Path] | None, typer.Option(help="jsonl/txt file or folder: bits per byte per source")] = None,
    preferences: Annotated[list[Path] | None, typer.Option(help="prompt/chosen/rejected (or HH) jsonl")] = None,
    reference: Annotated[Path | None, typer.Option(help="reference model folder for DPO reward accuracy")] = None,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="default: each task's own (gsm8k 5, mbpp 3)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N items of each task")] = None,
    max_gen_tokens: Annotated[int | None, typer.Option(min=1, help="cap generative tasks' new tokens")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: all cores); scores are exact per count")] = 0,
    output: Annotated[Path | None, typer.Option(help="where results.json and samples.jsonl go")] = None,
    list_tasks: Annotated[bool, typer.Option("--list", help="list the built-in tasks and exit")] = False,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("runs"),
) -> None:
    """Evaluate a model folder (tasks scored as lm-eval does, bits per byte, preferences), or a recipe's model."""
    with _user_errors():
        if list_tasks:
            _print_task_list()
            return
        if target is not None and (Path(target) / "config.json").is_file():
            from clearlm.eval.results import write_results
            from clearlm.eval.run import EvalRequest, evaluate_model

            req = EvalRequest(
                Path(target), [t.strip() for t in (tasks or "").split(",") if t.strip()], task_file or [], data_dir,
                bpb or [], preferences or [], reference, num_fewshot, limit, batch_size, threads, max_gen_tokens,
            )  # fmt: skip
            results, samples, meta = evaluate_model(req)
            out = output or workdir / "eval" / Path(target).resolve().name
            write_results(out, results, samples, meta)
            shots = "each task's default shots" if num_fewshot is None else f"{num_fewshot}-shot"
            _print_results(f"{target} ({shots})", results)
            console.print(f"results: {out / 'results.json'}")
            return
        if tasks or task_file or bpb or preferences:
            raise InputError(f"{target}: not a model folder (no config.json)")
        pipe = _pipeline(target, set_, workdir, "eval")
        pipe.run("eval")
        _summary(pipe)


def _print_task_list() -> None:
    from clearlm.eval.taskspec import builtin_tasks

    table = Table(title="built-in tasks")
    for col in ("task", "type", "metrics", "data file", "licence"):
        table.add_column(col)
    for spec in builtin_tasks().values():
        kind = "partial" if spec.partial else spec.output_type
        table.add_row(spec.name, kind, ", ".join(spec.metrics), spec.data_file, spec.license)
    Console().print(table)


def _print_results(title: str, results: dict[str, Any]) -> None:
    table = Table(title=title)
    for col in ("task", "metric", "value", "stderr", "items"):
        table.add_column(col)
    for task, metrics in results.items():
        if task.startswith("bpb:"):
            for domain, m in metrics.items():
                table.add_row(f"{task} {domain}", "bits_per_byte", f"{m['bits_per_byte']:.4f}", "", str(m["documents"]))
        else:
            for row in metric_rows({task: metrics}):
                table.add_row(*map(str, row))
    Console().print(table)


@app.command()
def release(recipe: RecipeArg = None, set_: SetOpt = None, workdir: WorkdirOpt = Path("runs")) -> None:
    """Assemble the release folder (running any stage that is not up to date)."""
    with _user_errors():
        pipe = _pipeline(recipe, set_, workdir, "release")
        art = pipe.run("release")
        _summary(pipe)
        console.print(f"release: [bold]{art.path}[/]")


@app.command()
def generate(
    release_dir: Annotated[Path, typer.Argument(metavar="RELEASE", help="a release or any causal LM folder")],
    prompt: Annotated[str, typer.Argument(help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="0 = no top-k filtering")] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="1 = no nucleus filtering")] = 1.0,
    seed: int = 0,
    stop: Annotated[list[str] | None, typer.Option(help="end the text before this string (repeatable)")] = None,
    chat: Annotated[bool, typer.Option(help="treat PROMPT as a user turn of the release's chat template")] = False,
) -> None:
    """Sample a continuation of PROMPT from a release (with --chat: the assistant's answer to it)."""
    from clearlm.data.chat import ChatTemplate
    from clearlm.model.generate import Sampling, complete
    from clearlm.release.load import load_release

    with _user_errors():
        model, tok, eos_id = load_release(release_dir)
        if max_new_tokens >= model.cfg.context:
            raise InputError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context "
                             f"of {model.cfg.context} tokens")  # fmt: skip
        if top_p == 0:
            raise InputError("--top-p must be above 0 (1 = no nucleus filtering)")
        text = prompt
        if chat:
            config_path = release_dir / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            if not config.get("chat_template"):
                raise InputError(f"{config_path}: no chat_template (is this a post-trained release?)")
            template = ChatTemplate(config["chat_template"], config.get("eos_token", "<|endoftext|>"))
            text, _ = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        answer = complete(model, tok, text, max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_k, top_p,
                          seed), eos_id=eos_id, stop=stop or ())  # fmt: skip
        sys.stdout.write((answer if chat else prompt + answer) + "\n")


@app.command()
def trace(
    release_dir: Annotated[Path, typer.Argument(metavar="RELEASE", help="a release built with release.trace_index")],
    text: Annotated[str | None, typer.Argument(help="the text to trace (a model's output)")] = None,
    generations: Annotated[bool, typer.Option(help="trace the release's own sample generations")] = False,
    min_tokens: Annotated[int, typer.Option(min=1, help="shortest span kept (OLMoTrace: 1)")] = 1,
    documents: Annotated[int, typer.Option(min=1, help="documents shown per span (OLMoTrace: 10)")] = 10,
    density: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="spans kept per token of the text, the rarest first (OLMoTrace: 0.05)"),
    ] = 0.05,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the spans here as JSON")] = None,
) -> None:
    """Where a text's words come from: its long, rare spans that occur verbatim in the training data (OLMoTrace)."""
    from tokenizers import Tokenizer

    from clearlm.trace.query import as_json, open_index, word_starts
    from clearlm.trace.query import trace as find_spans

    with _user_errors():
        if (text is None) == (not generations):
            raise InputError("give a TEXT to trace, or --generations (not both)")
        if not (release_dir / "tokenizer.json").is_file():
            raise InputError(f"{release_dir / 'tokenizer.json'}: not found (expected a clearlm release)")
        tok = Tokenizer.from_file(str(release_dir / "tokenizer.json"))
        index = open_index(release_dir / "trace")
        texts = (
            [text]
            if text is not None
            else [row["completion"] for row in map(json.loads, (release_dir / "eval" / "generations.jsonl").open())]
        )
        found, bow = [], set(word_starts(tok))
        for item in texts:
            spans = find_spans(index, tok, tok.encode(item, add_special_tokens=False).ids, min_tokens=min_tokens,
                               documents=documents, density=density, bow=bow)  # fmt: skip
            found.append({"text": item, "spans": as_json(spans)})
            table = Table("span", "tokens", "count", "documents (stage · source · licence)", title=item[:60])
            for span in spans:
                docs = "\n".join(f"{d.id} ({d.stage} · {d.source} · {d.license})" for d in span.documents[:3])
                more = len(span.documents) - 3
                table.add_row(repr(span.text), str(span.end - span.start), str(span.count),
                              docs + (f"\n... {more} more" if more > 0 else ""))  # fmt: skip
            Console().print(table)
        if json_out is not None:
            json_out.write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")


@app.command()
def export(
    release_dir: Annotated[Path, typer.Argument(metavar="RELEASE", help="a release or a Llama / OLMo 2 model folder")],
    gguf: Annotated[Path, typer.Option(help="write the model, tokenizer and chat template to this GGUF file")],
    dtype: Annotated[str, typer.Option(help="weights' type: f32, f16 or q8_0 (norms stay f32)")] = "f32",
) -> None:
    """Write a release as a GGUF file that llama.cpp (llama-cli, llama-server, llama-cpp-python) runs."""
    from clearlm.release.gguf import export_gguf

    with _user_errors():
        if dtype not in ("f32", "f16", "q8_0"):
            raise InputError(f"--dtype {dtype!r}: expected f32, f16 or q8_0")
        done = export_gguf(release_dir, gguf, dtype)  # type: ignore[arg-type]
        console.print(f"wrote {done['file']}: {done['architecture']}, {done['tensors']} tensors ({dtype}, "
                      f"{human(done['tensor_bytes'])}), {done['tokens']} tokens, {done['merges']} merges"
                      + (", chat template" if done["chat_template"] else ""))  # fmt: skip


@app.command()
def verify(
    release_dir: Annotated[Path, typer.Argument(metavar="RELEASE", help="a clearlm release folder")],
    base_dir: Annotated[Path | None, typer.Option(help="where the recipe's data paths resolve (default: cwd)")] = None,
    workdir: Annotated[Path | None, typer.Option(help="where the scratch re-run goes (default: the temp dir)")] = None,
) -> None:
    """Check RELEASE against its manifest, re-run its recipe and compare every stage bit for bit.

    Exit status: 0 reproduced bit for bit, 1 a real difference, 3 a difference no larger than float rounding."""
    from clearlm.release.verify import verify_release

    with _user_errors():
        verdict = verify_release(release_dir, base_dir or Path.cwd(), workdir,
                                 RichReporter() if world().main else Reporter())  # fmt: skip
        if not world().main:
            return
        for line in verdict.lines:
            console.print(line, highlight=False)
        if verdict.rounding:
            console.print(f"[yellow]reproduced only to float rounding[/]: first difference at {verdict.stage}",
                          highlight=False)  # fmt: skip
            raise typer.Exit(3)
        if not verdict.reproduced:
            console.print(f"[red]not reproduced[/]: first difference at {verdict.stage}", highlight=False)
            raise typer.Exit(1)
        console.print("[green]reproduced bit-for-bit[/]")


@app.command()
def audit(
    path: Annotated[Path | None, typer.Argument(help="a model folder or repository checkout")] = None,
    mot: Annotated[Path | None, typer.Option(help="a Model Openness Tool model YAML file to classify")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
) -> None:
    """How open a model folder is (MOF class, licences, OSAID) and whether it holds unsafe files.

    Nothing in the folder is imported, unpickled or executed."""
    from clearlm.openness.audit import audit_folder, audit_mot, render

    with _user_errors():
        if (path is None) == (mot is None):
            raise InputError("give a folder to audit, or --mot FILE.yml")
        report = audit_mot(mot) if mot is not None else audit_folder(path)
        render(report, console)
        if json_out is not None:
            json_out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if report.get("unsafe"):
            raise typer.Exit(1)


def main() -> None:
    app()
