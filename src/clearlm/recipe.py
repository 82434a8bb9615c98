"""The recipe: one TOML file, validated by pydantic, that describes every stage of a run."""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clearlm.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_RECIPES = ("quickstart",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Section):
    """A user data source: a file, a directory or a glob of jsonl/txt files."""

    path: str
    source: str | None = Field(None, description="domain name; defaults to the file's stem")
    license: str = Field("NOASSERTION", description="SPDX identifier of the source's licence")
    weight: float = Field(1.0, ge=0, description="mixing weight: 0.5 keeps half the documents, 2.0 repeats them")
    tail_validation: float | None = Field(
        None, gt=0, lt=1, description="text files: hold out this last share of each file (from a line start) for "
        "validation, instead of a hashed choice of whole documents"
    )  # fmt: skip


class NormalizeConfig(_Section):
    """Unicode normalisation, Windows/Mac line endings to \\n, trailing spaces on each line removed."""

    type: Literal["normalize"]
    form: Literal["NFC", "NFKC"] = "NFC"


class GopherQualityConfig(_Section):
    """Gopher's quality rules with datatrove's GopherQualityFilter defaults."""

    type: Literal["gopher_quality"]
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = ["the", "be", "to", "of", "and", "that", "have", "with"]


class GopherRepetitionConfig(_Section):
    """Gopher's repetition rules with datatrove's GopherRepetitionFilter defaults."""

    type: Literal["gopher_repetition"]
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class C4QualityConfig(_Section):
    """C4's line and page rules with datatrove's C4QualityFilter defaults (it rewrites kept text)."""

    type: Literal["c4_quality"]
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class ExactDedupConfig(_Section):
    """Drop a document whose text, lower-cased with whitespace collapsed, was already kept."""

    type: Literal["exact_dedup"]


class MinHashDedupConfig(_Section):
    """Near-duplicate removal with MinHash LSH (FineWeb's settings: word 5-grams, 14 bands x 8 rows)."""

    type: Literal["minhash_dedup"]
    ngram: int = Field(5, ge=1)
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    seed: int = 1


class LanguageConfig(_Section):
    """Language identification with py3langid's offline model (langid.py, 97 languages); the language
    and its probability go into the document's metadata."""

    type: Literal["language"]
    languages: list[str] = Field(["en"], description="ISO 639-1 codes to keep; empty keeps every language")
    min_score: float = Field(0.65, ge=0, le=1, description="datatrove's LanguageFilter default threshold")


class PIIConfig(_Section):
    """Mask e-mail addresses, IP addresses and phone numbers with Dolma's replacement tokens."""

    type: Literal["pii"]
    email: bool = True
    ip: bool = True
    phone: bool = True


class DecontaminateConfig(_Section):
    """Drop documents sharing an n-gram (words, lower-cased) with the named evaluation sets."""

    type: Literal["decontaminate"]
    tasks: list[str] = Field([], description="built-in evaluation tasks (clearlm eval --list)")
    task_files: list[str] = Field([], description="task definition files, relative to the recipe")
    files: list[str] = Field([], description="other jsonl/txt evaluation sets, relative to the recipe")
    data_dir: str | None = Field(None, description="where the tasks' data files are")
    ngram: int = Field(13, ge=3)


StepConfig = Annotated[
    NormalizeConfig
    | GopherQualityConfig
    | GopherRepetitionConfig
    | C4QualityConfig
    | ExactDedupConfig
    | MinHashDedupConfig
    | LanguageConfig
    | PIIConfig
    | DecontaminateConfig,
    Field(discriminator="type"),
]


class DataConfig(_Section):
    builtin: Literal["cpython-stdlib"] | None = Field(None, description="a built-in corpus to include")
    builtin_weight: float = Field(1.0, ge=0, description="mixing weight of the built-in corpus")
    builtin_weights: dict[Literal["cpython-stdlib/code", "cpython-stdlib/docs"], Annotated[float, Field(ge=0)]] = Field(
        {}, description="mixing weight of a built-in domain, instead of builtin_weight (0 leaves it out)"
    )
    sources: list[SourceConfig] = []
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    max_documents: int | None = Field(None, gt=0, description="keep the first N documents (quick runs)")
    steps: list[StepConfig] = Field([], description="cleaning steps, applied in order before the split")
    keep_removed_text: bool = Field(False, description="store removed documents' text in removed.jsonl")
    removed_sample: float = Field(
        1.0, gt=0, le=1, description="fraction of removed documents listed in removed.jsonl (by a hash of the id)"
    )
    workers: int = Field(1, ge=1, description="processes (or Ray actors) for the per-document cleaning steps")
    executor: Literal["local", "ray"] = Field("local", description="run the cleaning steps here or on Ray")
    ray_address: str | None = Field(None, description="a Ray cluster to join; default: start a local Ray instance")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="an unreadable file (corrupt, truncated): stop with an error, or skip it and warn"
    )

    @model_validator(mode="after")
    def _has_input(self) -> DataConfig:
        if self.builtin is None and not self.sources:
            raise ValueError("needs a builtin corpus or at least one entry in sources")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError('ray_address needs executor = "ray"')
        return self


class TokenizerConfig(_Section):
    vocab_size: int = Field(4096, ge=300, le=1 << 20)
    min_frequency: int = Field(2, ge=1)
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    special_tokens: list[str] = Field(
        ["<|system|>", "<|user|>", "<|assistant|>"],
        description="reserved for chat templates; never produced from plain text",
    )


class ModelConfig(_Section):
    architecture: Literal["llama", "olmo2"] = Field(
        "llama", description="llama: norm before each sublayer; olmo2: norm on sublayer outputs, QK-norm, untied"
    )
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="grouped-query attention; default n_heads")
    d_ff: int | None = Field(None, gt=0, description="SwiGLU hidden size; default ~8/3 d_model")
    context: int = Field(256, gt=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = Field(True, description="share input and output embeddings; default: llama yes, olmo2 no")
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _untied_for_olmo2(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("architecture") == "olmo2" and "tie_embeddings" not in data:
            return {**data, "tie_embeddings": False}
        return data

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head size (d_model / n_heads) must be even for RoPE")
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        return self


SPIKE_FACTOR = 3.0
SPIKE_HELP = ("stop when a step's loss exceeds this many times the median of the 20 steps before (and by over one "
              "nat); 0 = only stop on a NaN or infinite loss")  # fmt: skip
# Settings that only decide whether a run stops, not what it computes: left out of the stages' digests, so that
# raising one lets --resume continue the same run.
GUARD_SETTINGS = {"spike_factor"}


class TrainConfig(_Section):
    max_steps: int = Field(1000, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    grad_accum_steps: int = Field(
        1, gt=0, description="micro-batches per optimizer step over all processes (a multiple of their number)"
    )
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine decay, or warmup-stable-decay (constant, then linear decay at the end)"
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of max_steps spent decaying")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: orthogonalised momentum for hidden matrices, AdamW for the rest"
    )
    muon_lr: float = Field(0.02, gt=0, description="muon: learning rate of the hidden matrices (scheduled like lr)")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    z_loss: float = Field(0.0, ge=0, description="weight of the z-loss, log(Z)^2 per token (OLMo 2 uses 1e-5)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast matmuls to bfloat16")
    compile: bool = Field(False, description="torch.compile the model (falls back with a message where it cannot)")
    activation_checkpointing: bool = Field(False, description="recompute each block in backward to save memory")
    distributed: Literal["ddp", "fsdp2"] = Field("ddp", description="under torchrun: replicate or fully shard")
    peak_flops: float | None = Field(None, gt=0, description="the device's peak FLOP/s for MFU; default: measured "
                                     "(CPU) or looked up (GPU)")  # fmt: skip
    eval_interval: int = Field(100, ge=0, description="steps between validation losses; 0 = only at the end")
    eval_batches: int = Field(8, gt=0)
    checkpoint_interval: int = Field(0, ge=0, description="steps between checkpoints; 0 = only the final")
    keep_optimizer: Literal["last", "all"] = "last"
    spike_factor: float = Field(SPIKE_FACTOR, ge=0, description=SPIKE_HELP)
    threads: int = Field(0, ge=0, description="torch threads of every stage; 0 = this process's share of the cores")
    device: Literal["auto", "cpu", "cuda"] = "cpu"


class MidtrainConfig(_Section):
    """OLMo 2's second stage: a short run on a high-quality mix, the learning rate warmed up then annealed
    linearly to zero, once per data order in `seeds`; the released weights are the runs' uniform mean (a soup)."""

    base: str = Field("pretrain", description='"pretrain" (this recipe\'s model) or a Llama / OLMo 2 model folder '
                      "(continued pretraining, with the folder's tokenizer)")  # fmt: skip
    optimizer: Literal["continue", "fresh"] = Field(
        "continue", description="from pretraining: continue its optimizer state, or start a fresh one (a folder: fresh)"
    )
    data: DataConfig = Field(description="the mix: sources with weights, cleaning steps, validation share, as [data]")
    seeds: list[int] = Field([0], min_length=1, description="one run (ingredient) per data order, averaged")
    max_steps: int = Field(100, gt=0, description="steps of each ingredient")
    micro_batch_size: int | None = Field(None, gt=0, description="default: [train]'s")
    grad_accum_steps: int | None = Field(None, gt=0, description="default: [train]'s")
    lr: float | None = Field(None, gt=0, description="peak learning rate, annealed linearly to 0; default: [train]'s")
    warmup_steps: int = Field(0, ge=0)
    checkpoint_interval: int = Field(0, ge=0, description="steps between checkpoints; 0 = only the final")
    spike_factor: float = Field(SPIKE_FACTOR, ge=0, description=SPIKE_HELP)

    @model_validator(mode="after")
    def _warmup_fits(self) -> MidtrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must differ (got {self.seeds})")
        return self


class EvalConfig(_Section):
    bpb: bool = True
    batch_size: int = Field(8, gt=0)
    max_documents_per_domain: int | None = Field(None, gt=0)
    tasks: list[str] = Field([], description="built-in tasks (clearlm eval --list)")
    task_files: list[str] = Field([], description="task definition files, relative to the recipe")
    data_dir: str | None = Field(None, description="folder of task data files; the run's data split is also searched")
    num_fewshot: int | None = Field(None, ge=0, description="None: each task's own default")
    limit: int | None = Field(None, gt=0, description="first N items of each task")


class ReleaseConfig(_Section):
    """Licences default to the Model Openness Framework's recommendations, one per content type."""

    name: str | None = None
    weights_license: str = Field("CDLA-Permissive-2.0", description="SPDX id of the weights and other data")
    code_license: str = Field("Apache-2.0", description="SPDX id of the code (clearlm's own is Apache-2.0)")
    docs_license: str = Field("CC-BY-4.0", description="SPDX id of the documents: cards, technical report")
    paper: str | None = Field(None, description="path in the release or URL of a research paper")
    include_datasets: bool = Field(True, description="put the cleaned datasets in the release (zstd-compressed)")
    trace_index: bool = Field(
        False,
        description="index everything the model was trained on (corpora and post-training data) so that "
        "`clearlm trace` finds where the model's words come from (OLMoTrace)",
    )
    authors: list[str] = []
    description: str = ""

    @field_validator("weights_license", "code_license", "docs_license")
    @classmethod
    def _spdx(cls, value: str) -> str:
        from clearlm.openness.licenses import normalize

        spdx = normalize(value).spdx
        if spdx is None:
            raise ValueError(f"{value!r} is not an SPDX licence id (e.g. Apache-2.0, CDLA-Permissive-2.0, CC-BY-4.0)")
        return spdx


class ChatDataConfig(_Section):
    path: str = Field(description="a .jsonl or .json file: messages, prompt/completion or instruction/output rows")
    license: str = Field("NOASSERTION", description="SPDX licence of the file")


class _PostTrainConfig(_Section):
    """What SFT and DPO share: data, optimizer, schedule, batching, checkpoints."""

    base: str = Field("pretrain", description='"pretrain" (this recipe\'s model), "sft" (DPO only) or a model folder')
    builtin: Literal["stdlib-functions"] | None = Field(
        None, description="built-in set made from the corpus's standard-library functions (data/instructions.py)"
    )
    data: list[ChatDataConfig] = []
    epochs: int = Field(2, gt=0)
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    max_length: int | None = Field(None, gt=1, description="tokens per example; default: the model's context")
    checkpoint_interval: int = Field(0, ge=0, description="steps between checkpoints to resume from; 0 = none")
    spike_factor: float = Field(SPIKE_FACTOR, ge=0, description=SPIKE_HELP)

    @model_validator(mode="after")
    def _has_data(self) -> _PostTrainConfig:
        if self.builtin is None and not self.data:
            raise ValueError('needs builtin = "stdlib-functions" or at least one entry in data')
        return self


class SFTConfig(_PostTrainConfig):
    """Supervised fine-tuning. Defaults follow Tulu 3's SFT recipe (open-instruct: linear schedule,
    warmup ratio 0.03, 2 epochs, AdamW without weight decay) with a learning rate scaled for small models."""

    builtin_examples: int = Field(400, gt=0, description="how many built-in examples to make")
    packing: bool = Field(False, description="several examples per row (attention kept within each)")

    @model_validator(mode="after")
    def _not_itself(self) -> SFTConfig:
        if self.base == "sft":
            raise ValueError('base: SFT cannot start from itself; use "pretrain" or a model folder')
        return self


class DPOConfig(_PostTrainConfig):
    """Preference tuning. Defaults follow Tulu 3's DPO recipe (open-instruct `dpo_norm`, i.e. TRL's
    `sigmoid_norm`, beta 5, 1 epoch, linear schedule with warmup ratio 0.1) with a learning rate scaled
    for small models."""

    base: str = Field("sft", description='"sft", "pretrain", or a model folder')
    reference: str | None = Field(None, description="reference model folder; default: the starting model")
    builtin_pairs: int = Field(200, gt=0)
    loss: Literal["sigmoid", "ipo", "sigmoid_norm", "simpo"] = "sigmoid_norm"
    beta: float = Field(5.0, gt=0)
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin (TRL's CPO default)")
    epochs: int = Field(1, gt=0)
    lr: float = Field(5e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    micro_batch_size: int = Field(4, gt=0)
    held_out_fraction: float = Field(0.1, ge=0, lt=1, description="pairs kept for preference accuracy")


class PromptDataConfig(_Section):
    path: str = Field(description="a .jsonl or .json file: `prompt` (text or messages) plus what its verifiers read")
    license: str = Field("NOASSERTION", description="SPDX licence of the file")


class VerifierConfig(_Section):
    """One reward: a built-in verifier (clearlm.verifiers.VERIFIERS) or "user" with `function`, weighted."""

    name: str
    weight: float = 1.0
    function: str | None = Field(None, description='"file.py:function", for name = "user": runs your own code')

    @model_validator(mode="after")
    def _function_for_user(self) -> VerifierConfig:
        from clearlm.verifiers import check_name

        check_name(self.name)
        if (self.name == "user") != (self.function is not None):
            raise ValueError('function is given exactly when name = "user" (a "file.py:function" of yours)')
        if self.function is not None and not re.fullmatch(r"[^:]+\.py:[A-Za-z_]\w*", self.function):
            raise ValueError(f'function {self.function!r} is not "file.py:function"')
        return self


class RLVRConfig(_Section):
    """Reinforcement learning with verifiable rewards: GRPO as TRL's GRPOTrainer computes it (Tulu 3's third stage).
    Defaults are TRL 1.16's (loss "dapo", 8 generations, clipping 0.2, no KL penalty, group-scaled rewards) except the
    learning rate, scaled for small models, and the completion length."""

    base: str = Field("dpo", description='"dpo", "sft", "pretrain", or a model folder')
    builtin: Literal["stdlib-functions"] | None = Field(
        None, description="built-in prompts: write a standard-library function of the corpus (data/instructions.py)"
    )
    builtin_prompts: int = Field(200, gt=0)
    data: list[PromptDataConfig] = []
    verifiers: list[VerifierConfig] = Field(min_length=1)
    num_generations: int = Field(8, gt=1, description="completions per prompt (a group)")
    prompts_per_step: int = Field(4, gt=0, description="prompts per generation batch")
    max_steps: int = Field(20, gt=0, description="optimizer steps (num_iterations per generation batch)")
    num_iterations: int = Field(1, gt=0, description="optimization passes over each generation batch")
    micro_batch_size: int = Field(8, gt=0, description="completions per forward and backward pass")
    max_completion_length: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    beta: float = Field(0.0, ge=0, description="KL penalty to the starting model")
    use_bias_correction_kl: bool = Field(True, description="the KL term times the policy ratio (TRL's default)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clipping of the policy ratio: 1 - epsilon")
    epsilon_high: float | None = Field(None, gt=0, description="upper clipping (DAPO); default: epsilon")
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    held_out_fraction: float = Field(0.1, ge=0, lt=1, description="prompts kept for the mean reward before and after")
    checkpoint_interval: int = Field(0, ge=0, description="steps between checkpoints to resume from; 0 = none")
    spike_factor: float = Field(0.0, ge=0, description="0: off (a policy-gradient loss has no scale to spike from); "
                                + SPIKE_HELP)  # fmt: skip

    @model_validator(mode="after")
    def _consistent(self) -> RLVRConfig:
        if self.builtin is None and not self.data:
            raise ValueError('needs builtin = "stdlib-functions" or at least one entry in data')
        if self.max_steps % self.num_iterations:
            raise ValueError(f"max_steps {self.max_steps} is not a multiple of num_iterations {self.num_iterations}")
        if self.base == "rlvr":
            raise ValueError('base: RLVR cannot start from itself; use "dpo", "sft", "pretrain" or a model folder')
        return self


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    data: DataConfig | None = None
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    midtrain: MidtrainConfig | None = None
    sft: SFTConfig | None = None
    dpo: DPOConfig | None = None
    rlvr: RLVRConfig | None = None
    eval: EvalConfig = EvalConfig()
    release: ReleaseConfig = ReleaseConfig()


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from (relative data paths resolve against `base_dir`)."""

    model_config = ConfigDict(frozen=True)

    recipe: Recipe
    origin: str
    base_dir: Path
    text: str


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as TOML, else taken as a string."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.max_steps=200")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[leaf] = _parse_value(value.strip())


def _format_errors(origin: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] != "missing":
            msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{origin}: " + "; ".join(parts)


def parse_recipe(text: str, origin: str, base_dir: Path, overrides: list[str] = ()) -> LoadedRecipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{origin}: invalid TOML: {e}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_errors(origin, e)) from None
    from clearlm.stages import resolve  # the stage table reads recipes: imported here, not above

    try:
        resolve(recipe, ["release"])  # every stage the recipe needs has its section
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None
    return LoadedRecipe(recipe=recipe, origin=origin, base_dir=base_dir, text=text)


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> LoadedRecipe:
    """Load a recipe file, or a built-in recipe by name (`quickstart` when `path` is None)."""
    name = str(path) if path is not None else "quickstart"
    if name in BUILTIN_RECIPES and not Path(name).exists():
        text = resources.files("clearlm").joinpath("recipes", f"{name}.toml").read_text()
        return parse_recipe(text, f"<builtin {name}>", Path.cwd(), overrides)
    file = Path(name)
    if not file.is_file():
        raise RecipeError(f"{file}: recipe file not found (built-in recipes: {', '.join(BUILTIN_RECIPES)})")
    return parse_recipe(file.read_text(), str(file), file.resolve().parent, overrides)


def without_guards(loaded: LoadedRecipe) -> LoadedRecipe:
    """The recipe with its training guards off. They decide whether a run stops, never what it computes, so a
    re-run of a finished run (`verify`) must not stop where the run itself was let through (a guard raised with
    --set to resume it, or a release made before the guard existed)."""
    recipe = loaded.recipe
    off = {key: 0.0 for key in GUARD_SETTINGS}
    update = {name: section.model_copy(update=off) for name in type(recipe).model_fields
              if all(hasattr(section := getattr(recipe, name), key) for key in off)}  # fmt: skip
    return loaded.model_copy(update={"recipe": recipe.model_copy(update=update)})
