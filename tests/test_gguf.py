"""GGUF export: names, the rotary row order, the file's contents, the Ollama Modelfile, and (when
llama-cpp-python is installed: `make test-gguf`) a real llama.cpp agreeing with transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import TINY_MODEL, random_causal_lm, tiny_config, write_qa_jsonl
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.gguf_export import (
    IGNORE_MERGES,
    SPLIT_PRE_TOKENIZERS,
    gguf_tensor_name,
    interleave_rope_rows,
    known_pre_tokenizer,
    modelfile,
    ollama_name,
    rope_frequency_factors,
    write_gguf,
)
from tunelab.train import train

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed: make test-gguf"
)


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA run exported as GGUF (f16) and as a merged fp32 model."""
    tmp = tmp_path_factory.mktemp("gguf")
    config = tiny_config(
        tiny_model_dir,
        write_qa_jsonl(tmp / "qa.jsonl"),
        tmp / "run",
        **{"train.max_steps": 8, "train.lr": 3e-2},
    )
    run_dir = train(config).run_dir
    # a folder name with a space and capitals: the file inside is named as Ollama names models
    export_run(run_dir, "gguf", tmp / "Tiny GGUF")
    export_run(run_dir, "merged", tmp / "merged")
    return tmp / "Tiny GGUF", tmp / "merged"


def test_ollama_names():
    assert [ollama_name(name) for name in ("Tiny GGUF", "run_1.v2", "  Ünïcode!! ", "---")] == [
        "tiny-gguf",
        "run_1.v2",
        "n-code",
        "model",
    ]


def test_tensor_names_are_llama_cpps():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.layers.11.self_attn.k_proj.weight") == "blk.11.attn_k.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.layers.2.post_attention_layernorm.weight") == "blk.2.ffn_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.layers.1.self_attn.q_proj.bias") == "blk.1.attn_q.bias"  # Qwen2
    assert gguf_tensor_name("model.layers.1.self_attn.k_norm.weight") == "blk.1.attn_k_norm.weight"  # Qwen3
    with pytest.raises(TunelabError, match="no llama.cpp name for tensor model.layers.0.mlp.fc1.weight"):
        gguf_tensor_name("model.layers.0.mlp.fc1.weight")


def _llama_config(rope: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 10000.0} | rope)


# Llama 3.1's rope with its context shrunk to 64 tokens, so that a 16-dim head has every kind of pair
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_rope_frequency_factors_are_llama_3s_formula():
    # pair i of a 16-dim head turns once in 2π·10000^(i/8) positions: 6.3, 19.9, 62.8, 199, ... Pairs
    # turning faster than 64/4 = 16 positions keep their frequency (factor 1), slower than 64 are
    # slowed 8×, and between, the factor is 1 / ((1 - s)/8 + s) with s = (64/wavelength - 1) / (4 - 1)
    expected = [1.0, 1.2940, 7.6674, 8.0, 8.0, 8.0, 8.0, 8.0]
    factors = rope_frequency_factors(_llama_config(LLAMA3_ROPE))
    torch.testing.assert_close(factors, torch.tensor(expected), atol=1e-3, rtol=0)
    linear = rope_frequency_factors(_llama_config({"rope_type": "linear", "factor": 4.0}))
    torch.testing.assert_close(linear, torch.full((8,), 4.0))
    assert rope_frequency_factors(_llama_config({"rope_type": "default"})) is None
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(TunelabError, match="rope scaling 'yarn' is not written; export --format merged"):
        rope_frequency_factors(_llama_config(yarn))


@pytest.mark.parametrize(
    "architecture, config, message",
    [
        (
            "Qwen3",
            {"attention_bias": True},
            "llama.cpp's qwen3 graph has no model.layers.0.self_attn.q_proj.bias",
        ),
        ("Llama", {"mlp_bias": True}, "llama.cpp's llama graph has no model.layers.0.mlp.gate_proj.bias"),
        (
            "Qwen2",
            {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1},
            "attends through a sliding window of 32 tokens, which llama.cpp's qwen2 graph does not",
        ),
        ("Mistral", {"sliding_window": 32}, "sliding window of 32 tokens, which llama.cpp's llama graph"),
        ("Gemma", {}, "GGUF export writes llama, mistral, qwen2, qwen3 models; this one is gemma"),
        (
            "Qwen2",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "for Llama",
        ),
    ],
)
def test_what_no_llama_cpp_graph_computes_is_refused(architecture, config, message):
    from tunelab.gguf_export import llama_cpp_graph

    shape = {"head_dim": 8, "max_position_embeddings": 64}
    with pytest.raises(TunelabError, match=message):
        llama_cpp_graph(random_causal_lm(architecture, **shape | config))
    if architecture != "Gemma":  # the same model without that one feature is written
        without = {"sliding_window": None} if architecture == "Mistral" else {}
        assert llama_cpp_graph(random_causal_lm(architecture, **shape | without))


def _tokenizer_split_by(smollm2_dir: str, pattern: str, ignore_merges: bool):
    """SmolLM2's tokenizer with its pre-tokenizer replaced by Llama 3's or Qwen2's form: a Split by
    `pattern`, then byte-level mapping; and its BPE told to `ignore_merges` (as Llama 3's is)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.backend_tokenizer.model.ignore_merges = ignore_merges
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


def test_llama_3s_and_qwen2s_pre_tokenizers_are_named_by_their_regex(smollm2_dir):
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    # transformers' own Qwen2 tokenizer (on a toy vocabulary) carries llama.cpp's qwen2 regex
    assert (
        known_pre_tokenizer(Qwen2Tokenizer(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])) == "qwen2"
    )
    assert SPLIT_PRE_TOKENIZERS[PRETOKENIZE_REGEX] == "qwen2"
    for pattern, name in SPLIT_PRE_TOKENIZERS.items():
        ignores = name in IGNORE_MERGES
        assert known_pre_tokenizer(_tokenizer_split_by(smollm2_dir, pattern, ignores)) == name
        # llama.cpp's llama-bpe skips merges for whole words and qwen2 does not: a tokenizer that does
        # otherwise would split some words differently there
        assert known_pre_tokenizer(_tokenizer_split_by(smollm2_dir, pattern, not ignores)) is None
    assert known_pre_tokenizer(_tokenizer_split_by(smollm2_dir, r"\s+", False)) is None  # no known regex


def test_interleaved_rows_rotate_as_halves_do():
    # one head of 4 dims: rows (0, 1 | 2, 3) become pairs (0, 2), (1, 3)
    rows = torch.arange(4.0).view(4, 1)
    assert interleave_rope_rows(rows, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    # and the rotation agrees: HF rotates (q_i, q_{i+d/2}), llama.cpp (q'_{2i}, q'_{2i+1}) by angle_i
    torch.manual_seed(0)
    heads, dim, width = 2, 8, 5
    weight, x = torch.randn(heads * dim, width, dtype=torch.float64), torch.randn(width, dtype=torch.float64)
    angle = 0.7 * torch.arange(dim // 2, dtype=torch.float64)
    q = (weight @ x).view(heads, dim)
    first, second = q[:, : dim // 2], q[:, dim // 2 :]
    hf = torch.cat(
        [first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], -1
    )
    pairs = (interleave_rope_rows(weight, heads) @ x).view(heads, dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cpp = torch.stack([even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()], -1)
    torch.testing.assert_close(
        cpp.reshape(heads, dim), interleave_rope_rows(hf.reshape(-1, 1), heads).view(heads, dim)
    )


def test_the_gguf_holds_the_merged_weights_tokenizer_and_template(gguf_export):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, merged_dir = gguf_export
    reader = gguf.GGUFReader(str(folder / "tiny-gguf.f16.gguf"))
    fields = {
        name: field.contents() for name, field in reader.fields.items() if "token" not in name or "id" in name
    }
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # the built-in's pre-tokenizer
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    heads = merged.config.num_attention_heads
    for hf_name, expected in (
        (
            "model.layers.1.self_attn.q_proj.weight",
            interleave_rope_rows(merged.model.layers[1].self_attn.q_proj.weight, heads),
        ),
        ("model.layers.0.mlp.up_proj.weight", merged.model.layers[0].mlp.up_proj.weight),
    ):
        stored = torch.from_numpy(tensors[gguf_tensor_name(hf_name)].data.copy()).float()
        torch.testing.assert_close(stored, expected.detach().half().float())


def test_the_modelfile_carries_the_chat_format_stop_token_and_system_prompt(gguf_export):
    text = (gguf_export[0] / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny-gguf.f16.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


def test_a_template_ollama_has_no_format_for_gets_only_the_stop_token(smollm2_dir):
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert modelfile("m.gguf", tokenizer) == 'FROM ./m.gguf\nPARAMETER stop "<|im_end|>"\n'


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16"])
def test_llama_cpp_generates_what_transformers_generates(gguf_export, gguf_type):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, merged_dir = gguf_export
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    llm = Llama(str(folder / f"tiny-gguf.{gguf_type}.gguf"), n_ctx=256, verbose=False, seed=0)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q: 3+4="}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # the same pre-tokenizer
    with torch.no_grad():
        expected = merged.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[
            0, len(ids) :
        ].tolist()
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        generated.append(token)
        if len(generated) == len(expected) or token == tokenizer.eos_token_id:
            break
    assert generated == expected


@needs_llama_cpp
def test_llama_cpp_logits_match_transformers(gguf_export):
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    folder, merged_dir = gguf_export
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    llm = Llama(str(folder / "tiny-gguf.f16.gguf"), n_ctx=256, verbose=False, logits_all=True)
    ids = [
        1,
        9690,
        198,
        2683,
        359,
        253,
        5356,
        5646,
        11173,
        3365,
        3511,
        308,
        34519,
        28,
        7018,
        411,
        407,
        19712,
        8182,
        2,
    ]
    llm.eval(ids)
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[: len(ids)])
    # f16 weights against fp32: agreement to f16 rounding, at every position (rotary angles included)
    assert np.abs(got - expected).max() < 1e-2 * np.abs(expected).max(), np.abs(got - expected).max()


@needs_llama_cpp
@pytest.mark.integration
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_smollm2_through_llama_cpp(tmp_path, smollm2_dir, gguf_type):
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from tunelab.gguf_export import known_pre_tokenizer, write_gguf
    from tunelab.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(smollm2_dir)
    tokenizer.save_pretrained(tmp_path)
    path = tmp_path / f"smollm2.{gguf_type}.gguf"
    write_gguf(model, tokenizer, tmp_path, path, gguf_type, known_pre_tokenizer(tokenizer))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(path), n_ctx=512, verbose=False, logits_all=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    agree = (got.argmax(-1) == expected.argmax(-1)).mean()
    if gguf_type == "f16":
        assert np.abs(got - expected).max() < 1e-2 * np.abs(expected).max() and agree == 1.0
    else:  # 8-bit weights: the same next token almost everywhere
        assert agree >= 0.9, agree


# architectures besides the plain Llama above: (transformers' class prefix, llama.cpp's pre-tokenizer,
# config), each with what its GGUF must carry over
ARCHITECTURES = {
    "qwen2": ("Qwen2", "qwen2", {}),  # q/k/v biases, rotation by halves
    "qwen3": ("Qwen3", "qwen2", {"head_dim": 32}),  # q/k norms, heads wider than hidden_size / heads
    "llama-3.1-rope": ("Llama", "llama-bpe", {"rope_parameters": {"rope_theta": 10000.0} | LLAMA3_ROPE}),
    "linear-rope": (
        "Llama",
        "llama-bpe",
        {"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 4.0}},
    ),
    "llama-bias": ("Llama", "llama-bpe", {"attention_bias": True}),  # biases reordered with their rows
}


@needs_llama_cpp
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_llama_cpp_reads_each_architecture_as_transformers_computes_it(tmp_path, smollm2_dir, architecture):
    import numpy as np
    from llama_cpp import Llama

    prefix, pre_tokenizer, overrides = ARCHITECTURES[architecture]
    pattern = next(regex for regex, name in SPLIT_PRE_TOKENIZERS.items() if name == pre_tokenizer)
    tokenizer = _tokenizer_split_by(smollm2_dir, pattern, pre_tokenizer in IGNORE_MERGES)
    model = random_causal_lm(prefix, vocab_size=len(tokenizer), **TINY_MODEL | overrides).eval()
    with torch.no_grad():  # biases (zero) and norms (one) made random, so that a misplaced one shows
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    tokenizer.save_pretrained(tmp_path)
    path = tmp_path / "model.f16.gguf"
    write_gguf(model, tokenizer, tmp_path, path, "f16", known_pre_tokenizer(tokenizer))
    text = "I'll pay 12345 dollars on 2026-11-24.\nThanks!!  Bye"  # digits split by threes or one by one
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(path), n_ctx=256, verbose=False, logits_all=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    # with its special tokens: a BOS where transformers adds one, none where it adds none (SmolLM2's)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"]
    ids += list(range(1000, 1080))  # positions far enough for every rotary pair to turn
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - expected).max() < 1e-2 * np.abs(expected).max(), np.abs(got - expected).max()
