"""GGUF export: the file holds the model's weights, hyperparameters, vocabulary and chat template as llama.cpp's own
converter writes them, bad folders are one-line errors, and llama.cpp (llama-cpp-python, built from source) runs the
file as clearlm runs the folder: the same tokens for text, the same greedy continuations, next-token logits within
1e-4 (float32, with a float32 key/value cache)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONVERSATIONS

from clearlm.data.chat import CHAT_TEMPLATE, ChatTemplate
from clearlm.errors import InputError
from clearlm.model.generate import generate
from clearlm.model.hf import save_hf
from clearlm.model.transformer import Transformer, TransformerConfig

gguf = pytest.importorskip("gguf")
from clearlm.release.gguf import _permute, export_gguf  # noqa: E402

ARCHITECTURES = {"llama": {}, "olmo2": {"architecture": "olmo2", "n_kv_heads": 2}}
TEXTS = ["the quick brown fox jumps over it", "def add(a, b):\n    return a + b\n\n\n", "Seven.  Why?\tGreen!",
         "naïve café — 3.14159 and 2,000 items", "What color is the sky?\n\n  It is blue."]  # fmt: skip


def _folder(root: Path, tok, arch: str) -> tuple[Path, Transformer]:
    """A post-trained-release-like folder: a sharpened random model (clear greedy margins), the chat tokenizer padded
    by four unused ids, clearlm's tokenizer configs and chat template."""
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size() + 4, d_model=64, n_layers=2, n_heads=4, context=128,
                            **ARCHITECTURES[arch])  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 3.0))
    folder = root / arch
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    save_hf(model.eval(), folder, bos_id=eos, eos_id=eos, pad_id=pad)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE, "add_bos_token": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_file_holds_the_weights_hyperparameters_vocabulary_and_chat_template(tmp_path, chat_tok, arch):
    folder, model = _folder(tmp_path, chat_tok, arch)
    done = export_gguf(folder, tmp_path / "m.gguf")
    assert done["tensors"] == 2 + 1 + 2 * (9 if arch == "llama" else 11) and not list(tmp_path.glob("*.partial"))
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = {k: f.contents() for k, f in reader.fields.items()}
    cfg = model.cfg
    assert field["general.architecture"] == arch and field[f"{arch}.block_count"] == 2
    assert field[f"{arch}.attention.head_count_kv"] == cfg.kv_heads and field[f"{arch}.context_length"] == 128
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    tokens = field["tokenizer.ggml.tokens"]
    assert tokens[: chat_tok.get_vocab_size()] == [chat_tok.id_to_token(i) for i in range(chat_tok.get_vocab_size())]
    assert tokens[-4:] == [f"[PAD{i}]" for i in range(cfg.vocab_size - 4, cfg.vocab_size)]
    types = field["tokenizer.ggml.token_type"]
    assert types[chat_tok.token_to_id("<|endoftext|>")] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert len(field["tokenizer.ggml.merges"]) == len(merges)
    assert field["tokenizer.ggml.eos_token_id"] == chat_tok.token_to_id("<|endoftext|>")
    assert field["tokenizer.ggml.add_bos_token"] is False
    template = field["tokenizer.chat_template"]
    assert "{% generation" not in template and "<|assistant|>" in template
    tensors = {t.name: t for t in reader.tensors}
    q = model.layers[0].self_attn.q_proj.weight.detach().numpy()
    stored = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(q.shape)
    assert np.array_equal(stored, _permute(q, cfg.n_heads) if arch == "llama" else q)
    if arch == "llama":  # the interleaving is a permutation of rows within each head
        assert not np.array_equal(stored, q) and np.array_equal(np.sort(stored, 0), np.sort(q, 0))
    embed = model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(embed.shape), embed)
    assert np.array_equal(np.asarray(tensors["output.weight"].data).reshape(embed.shape),
                          model.lm_head.weight.detach().numpy())  # fmt: skip
    for dtype, tolerance in (("f16", 2e-3), ("q8_0", 2e-2)):
        export_gguf(folder, tmp_path / f"{dtype}.gguf", dtype)  # type: ignore[arg-type]
        t = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{dtype}.gguf").tensors}
        assert t["blk.0.attn_norm.weight" if arch == "llama" else "blk.0.post_attention_norm.weight"].tensor_type == 0
        w = t["blk.1.ffn_down.weight"]
        values = gguf.quants.dequantize(w.data, w.tensor_type).reshape(model.layers[1].mlp.down_proj.weight.shape)
        original = model.layers[1].mlp.down_proj.weight.detach().numpy()
        assert np.abs(values - original).max() <= tolerance * np.abs(original).max(), dtype


def test_folders_it_cannot_export_are_one_line_errors(tmp_path, chat_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")  # fmt: skip
    chat_tok.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    with pytest.raises(InputError, match="supports Llama and OLMo 2 folders, not 'gpt2'"):
        export_gguf(tmp_path / "gpt2", tmp_path / "out.gguf")
    folder, _ = _folder(tmp_path, chat_tok, "llama")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match=r"tokenizer.json: llama.cpp's gpt-2 tokenizer would not split text"):
        export_gguf(folder, tmp_path / "out.gguf")
    (folder / "config.json").unlink()
    run = subprocess.run([sys.executable, "-m", "clearlm", "export", str(folder), "--gguf", str(tmp_path / "o.gguf")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "config.json: not found" in run.stderr
    assert not list(tmp_path.glob("*.gguf*"))


def test_without_the_gguf_package_export_says_how_to_get_it(tmp_path, chat_tok, monkeypatch):
    folder, _ = _folder(tmp_path, chat_tok, "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(InputError, match=r"GGUF export needs the `gguf` package: pip install gguf"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))


def _toolchain() -> bool:
    return bool(shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++")))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llama_cpp_runs_the_file_as_clearlm_runs_the_folder(tmp_path, chat_tok, arch):
    if not _toolchain():
        pytest.skip("no C++ toolchain (cmake and g++) to build llama-cpp-python from source")
    if os.environ.get("CLEARLM_REQUIRE_PEERS"):
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds from source)")
    folder, model = _folder(tmp_path, chat_tok, arch)
    export_gguf(folder, tmp_path / "m.gguf")
    # a float32 key/value cache (f16 by default)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # fmt: skip
    for text in TEXTS:  # llama.cpp's gpt-2 pre-tokenizer and BPE split text as the tokenizers library does
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == chat_tok.encode(text).ids, text
    prompts = [chat_tok.encode(t).ids for t in TEXTS]
    ours = generate(model, prompts, max_new_tokens=24)
    for prompt, completion in zip(prompts, ours, strict=True):
        llm.reset()
        llm.eval(prompt)
        theirs = []
        for _ in range(24):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs[-1]])
        assert theirs == completion.tokens
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0].numpy()
        assert np.abs(llm.scores[: len(prompt)] - logits).max() < 1e-4  # measured: 7e-6 at most
    # q8_0: the tensors llama.cpp's own quantizer makes from the float32 file, byte for byte (llama-cpp-python
    # 0.3.36 built on an AVX-512/AMX CPU crashes evaluating prompts on q8_0 weights, its own quantized files too)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    quantized = str(tmp_path / "llama-q8_0.gguf").encode()
    assert llama_cpp.llama_model_quantize(str(tmp_path / "m.gguf").encode(), quantized, ctypes.byref(params)) == 0
    export_gguf(folder, tmp_path / "q8_0.gguf", "q8_0")
    theirs_q8 = {t.name: t for t in gguf.GGUFReader(quantized.decode()).tensors}
    ours_q8 = {t.name: t for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert set(theirs_q8) == set(ours_q8)
    for name, t in theirs_q8.items():
        assert t.tensor_type == ours_q8[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(ours_q8[name].data)), name
    template = llm.metadata["tokenizer.chat_template"]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="")
    for conversation in CONVERSATIONS:
        messages = conversation[:-1]
        expected, _ = ChatTemplate().render(messages, add_generation_prompt=True)
        assert formatter(messages=messages).prompt == expected
