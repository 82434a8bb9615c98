"""Shared fixtures: a tiny recipe over a tiny corpus (and one with every stage), one pipeline run reused by
many tests, and a small chat tokenizer and decoder for the post-training tests."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from clearlm.data.chat import ChatTemplate
from clearlm.data.tokenizer import load_tokenizer, train_tokenizer
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.pipeline import Pipeline
from clearlm.recipe import TokenizerConfig, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' helpers, tested here
# `make test` (CI) sets this: a comparison whose peer library or ../shared/data is missing then fails, where a
# plain local `pytest` skips it
REQUIRE_PEERS = bool(os.environ.get("CLEARLM_REQUIRE_PEERS"))
# NLTK's punkt_tab (ifeval's sentence splitter) from ../shared/data, never downloaded: clearlm does not ship it
_PUNKT = Path(__file__).resolve().parents[2] / "shared" / "data" / "nltk_punkt_tab"
if _PUNKT.is_dir():
    os.environ.setdefault("NLTK_DATA", str(_PUNKT))
_MISSING_PEER = ("could not import", "../shared/data")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    if REQUIRE_PEERS and any(text in reason for text in _MISSING_PEER):
        report.outcome = "failed"
        report.longrepr = f"CLEARLM_REQUIRE_PEERS is set and a peer is missing: {reason}"


WORDS = [
    "def",
    "return",
    "class",
    "import",
    "self",
    "value",
    "list",
    "dict",
    "print",
    "open",
    "file",
    "data",
    "model",
    "token",
    "train",
    "loss",
]


def write_corpus(folder: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A small jsonl corpus in two domains with a few hundred words per document."""
    rng = random.Random(seed)
    path = folder / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(n_docs):
            domain = "prose" if i % 3 else "code"
            words = [rng.choice(WORDS) for _ in range(rng.randint(80, 200))]
            text = " ".join(words) if domain == "prose" else "\n".join(f"    {w} = {w}()" for w in words)
            f.write(json.dumps({"id": f"doc-{i}", "text": text, "source": domain}) + "\n")
    return path


TINY_RECIPE = """
name = "tiny"
seed = 3

[data]
validation_fraction = 0.2
sources = [{{ path = "{corpus}", license = "CC0-1.0" }}]

[tokenizer]
vocab_size = 320

[model]
d_model = 32
n_layers = 2
n_heads = 2
context = 32

[train]
max_steps = {steps}
micro_batch_size = 4
grad_accum_steps = 2
lr = 1e-2
warmup_steps = 2
eval_interval = 4
eval_batches = 2
checkpoint_interval = 4

[eval]
batch_size = 4
"""


def write_tiny_recipe(folder: Path, steps: int = 8) -> Path:
    corpus = write_corpus(folder)
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(corpus=corpus.name, steps=steps))
    return recipe


def write_all_stages_recipe(folder: Path) -> Path:
    """The tiny corpus through every stage (pretraining, mid-training, SFT, DPO and RLVR with checkpoints every step
    or few, eval, the trace index, release), with 1,000+ tokens a micro-batch: without MKL's strict mode a matmul's
    result then depends on its thread count on this kind of machine, so an inherited thread count would show."""
    recipe = write_tiny_recipe(folder, steps=10)
    rng = random.Random(7)

    def answer() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(120))

    chats = [{"messages": [{"role": "user", "content": f"Write about {w}."},
                           {"role": "assistant", "content": answer()}]} for w in WORDS * 4]  # fmt: skip
    pairs = [{"prompt": f"Write about {w}.", "chosen": answer(), "rejected": answer()} for w in WORDS * 2]
    (folder / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prompts = [{"prompt": [{"role": "user", "content": f"Write about {w}."}]} for w in WORDS]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    text = recipe.read_text().replace("d_model = 32", "d_model = 64").replace("context = 32", "context = 128")
    text = text.replace("micro_batch_size = 4", "micro_batch_size = 8")
    (folder / "mid").mkdir(exist_ok=True)
    write_corpus(folder / "mid", n_docs=24, seed=11)
    text += (
        "\n[midtrain]\nseeds = [1, 2]\nmax_steps = 3\nwarmup_steps = 1\ncheckpoint_interval = 1\n"
        '[midtrain.data]\nvalidation_fraction = 0.2\nsources = [{ path = "mid/corpus.jsonl", license = "CC0-1.0" }]\n'
    )
    text += ('\n[sft]\ndata = [{ path = "chat.jsonl", license = "CC0-1.0" }]\nepochs = 1\nmicro_batch_size = 16\n'
             "checkpoint_interval = 1\n"
             '\n[dpo]\ndata = [{ path = "pairs.jsonl", license = "CC0-1.0" }]\nepochs = 2\nmicro_batch_size = 8\n'
             "held_out_fraction = 0.25\ncheckpoint_interval = 1\n"
             '\n[rlvr]\ndata = [{ path = "prompts.jsonl", license = "CC0-1.0" }]\nmax_steps = 4\nnum_generations = 4\n'
             "prompts_per_step = 2\nmicro_batch_size = 8\nmax_completion_length = 16\nlr = 1e-3\n"
             "checkpoint_interval = 1\nheld_out_fraction = 0.25\n"
             '[[rlvr.verifiers]]\nname = "python_parses"\n'
             "\n[release]\ntrace_index = true\n")  # fmt: skip
    recipe.write_text(text)
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_tiny_recipe(tmp_path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One complete run of the tiny recipe (all stages), shared by read-only tests."""
    folder = tmp_path_factory.mktemp("tiny_run")
    pipe = Pipeline(load_recipe(write_tiny_recipe(folder)), folder / "runs")
    pipe.run("release")
    return pipe


CONVERSATIONS = [
    [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "Green."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Chlorophyll reflects green light."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b"}],
]  # fmt: skip


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20 + ["the quick brown fox jumps over it"] * 20
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(TokenizerConfig(vocab_size=300, min_frequency=1), folder / "train.jsonl", folder)
    return load_tokenizer(folder)


def hf_chat_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf.chat_template = ChatTemplate().source
    return hf


def tiny_decoder(vocab: int) -> Transformer:
    model = Transformer(TransformerConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, context=64))
    model.init_weights(0)
    return model


def write_outside_llama(folder: Path) -> Path:
    """A Llama folder written by transformers (not clearlm), whose tokenizer has none of clearlm's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator([" ".join(WORDS), "Say alpha twice.", "alpha alpha", "beta gamma delta"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=0,
                         tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
