"""GGUF for llama.cpp and Ollama: a merged Llama, Mistral, Qwen2 or Qwen3 model written with the `gguf`
package (f16 or q8_0), its tokenizer and chat template inside, and an Ollama Modelfile beside it.

llama.cpp's llama graph computes rotary embeddings on interleaved pairs of a head's dimensions,
Hugging Face's Llama on its two halves; the query and key rows are reordered to match
(`interleave_rope_rows`). Its qwen2 and qwen3 graphs rotate halves, as Hugging Face does.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from tunelab.errors import TunelabError

GGUF_TYPES = ("f16", "q8_0")


class GGUFArchitecture(NamedTuple):
    name: str  # llama.cpp's
    interleaved: bool  # its graph rotates interleaved pairs (llama) or halves, as Hugging Face does
    biases: tuple[str, ...]  # the layers whose biases its graph loads (a GGUF with others fails to load)


ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GGUF_ARCHITECTURES = {  # by Hugging Face model_type
    "llama": GGUFArchitecture("llama", True, (*ATTENTION, "self_attn.o_proj")),
    "mistral": GGUFArchitecture("llama", True, (*ATTENTION, "self_attn.o_proj")),  # the same graph
    "qwen2": GGUFArchitecture("qwen2", False, ATTENTION),  # llama's with q/k/v biases
    "qwen3": GGUFArchitecture("qwen3", False, ()),  # llama's with a norm of each query and key head
}
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CONVERT_HINT = "export --format merged and convert that with llama.cpp's convert_hf_to_gguf.py"
MODEL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_tensor_name(hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (llama.cpp's names)."""
    module, _, kind = hf_name.rpartition(".")
    if module in MODEL_TENSORS:
        return f"{MODEL_TENSORS[module]}.{kind}"
    prefix, _, rest = module.partition(".layers.")
    layer, _, sub = rest.partition(".")
    if prefix != "model" or sub not in LAYER_TENSORS:
        raise TunelabError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
    return f"blk.{int(layer)}.{LAYER_TENSORS[sub]}.{kind}"


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (its weight or bias) reordered per head from halves (x_0..x_{d/2-1} |
    x_{d/2}..) to pairs (x_0, x_{d/2}, x_1, x_{d/2+1}, ...): the layout llama.cpp's llama graph rotates."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# chat formats an Ollama template can be written for: (text before the turns, one turn's text, stop)
CHAT_FORMATS = {
    "chatml": ("", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_end|>"),
    "llama3": (
        "<|begin_of_text|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|eot_id|>",
    ),
}


def chat_template_family(tokenizer) -> str | None:
    """The CHAT_FORMATS entry the Jinja chat template renders a probe conversation exactly as, if any."""
    probe = [("system", "S"), ("user", "U"), ("assistant", "A")]
    try:
        text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in probe], tokenize=False)
    except Exception:  # no template, or one that refuses the probe
        return None
    for family, (start, turn, _) in CHAT_FORMATS.items():
        if text == start + "".join(turn.format(role=r, content=c) for r, c in probe):
            return family
    return None


def ollama_template(family: str) -> str:
    """The Go template Ollama renders a conversation of `family` with."""
    start, turn, _ = CHAT_FORMATS[family]
    each = turn.format(role="{{ .Role }}", content="{{ .Content }}")
    generation = turn.format(role="assistant", content="\0").partition("\0")[0]
    return f"{start}{{{{- range .Messages }}}}{each}{{{{ end }}}}{generation}"


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template adds when a conversation has none (SmolLM2's does)."""
    try:
        with_none = tokenizer.apply_chat_template([{"role": "user", "content": "U"}], tokenize=False)
        with_empty = tokenizer.apply_chat_template(
            [{"role": "system", "content": "\x00"}, {"role": "user", "content": "U"}], tokenize=False
        )
    except Exception:
        return None
    before, _, after = with_empty.partition("\x00")
    if (
        with_none.startswith(before)
        and with_none.endswith(with_empty[len(before) + 1 :])
        and len(with_none) > len(with_empty)
    ):
        return with_none[len(before) : len(with_none) - len(after)]
    return None


# runs trained with data.template alpaca or none: one prompt, rendered as in training
OLLAMA_PROMPT_TEMPLATES = {
    "alpaca": "### Instruction:\n{{ .Prompt }}\n\n### Response:\n",
    "none": "{{ .Prompt }}",
}


def ollama_name(name: str) -> str:
    """A folder name as an Ollama model name (lower case letters, digits, '.', '_', '-'): 'My Export' ->
    'my-export'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def modelfile(gguf_name: str, tokenizer, trained_template: str = "chat") -> str:
    """An Ollama Modelfile for the GGUF: the prompt format the run trained with (`trained_template`:
    the chat template as an Ollama template when it is a known format, else Ollama reads the template
    inside the GGUF), its stop token and default system prompt."""
    lines = [f"FROM ./{gguf_name}"]
    family = chat_template_family(tokenizer) if trained_template == "chat" else None
    if trained_template != "chat":
        lines.append(f'TEMPLATE """{OLLAMA_PROMPT_TEMPLATES[trained_template]}"""')
    if family:
        stop = CHAT_FORMATS[family][2]
        lines += [f'TEMPLATE """{ollama_template(family)}"""', f"PARAMETER stop {json.dumps(stop)}"]
    elif tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    system = default_system_prompt(tokenizer) if trained_template == "chat" else None
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def _sliding_window(config) -> int | None:
    """The sliding window some of the model's layers attend through, when shorter than its context."""
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    uses = sliding or (config.model_type == "mistral" and window)
    return window if uses and window and window < config.max_position_embeddings else None


def _rope(config) -> tuple[str, float]:
    """The rope type and base of a config (transformers 5's `rope_parameters`, or 4's keys)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    return kind, float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def rope_frequency_factors(config) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` for a model whose rotary frequencies are scaled per dimension pair, not
    by position (Llama 3.1's "llama3" rope, "linear"): each unscaled frequency / the scaled one that
    transformers computes for `config`; None when nothing is scaled. Rope that one factor per pair
    cannot express (yarn, dynamic, longrope) is refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind, base = _rope(config)
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise TunelabError(f"GGUF export: rope scaling '{kind}' is not written; {CONVERT_HINT}")
    scaled, _ = ROPE_INIT_FUNCTIONS[kind](config)
    dim = 2 * scaled.numel()
    unscaled = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (unscaled / scaled.double()).float()


def _tokenizer_to_gguf(writer, tokenizer, tokenizer_dir: Path, vocab_size: int, pre: str | None) -> None:
    """Tokens with their types (special tokens are CONTROL, so llama.cpp parses `<|im_start|>` in a
    prompt as one token), merges, special token ids and the chat template."""
    import gguf

    try:
        gguf.BpeVocab(tokenizer_dir)  # raises unless a byte-level BPE (GPT-2 style) tokenizer
    except FileNotFoundError:  # a SentencePiece-style (Llama 2) tokenizer: gguf reads it with scores
        vocab = gguf.LlamaHfVocab(tokenizer_dir)
        tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens(), strict=True))
        model = vocab.tokenizer_model
    else:
        by_id = {index: token for token, index in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for index in range(vocab_size):
            if index not in by_id:  # embedding rows beyond the tokenizer (padded vocabularies)
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(by_id[index])
                special = index in added and added[index].special
                user = index in added and not special
                types.append(
                    gguf.TokenType.CONTROL
                    if special
                    else gguf.TokenType.USER_DEFINED
                    if user
                    else gguf.TokenType.NORMAL
                )
        scores, model = [0.0] * len(tokens), "gpt2"
        if pre:
            writer.add_tokenizer_pre(pre)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    if "tokenizer.ggml.add_bos_token" not in writer.kv_data[0]:
        # unsaid, llama.cpp adds one for some pre-tokenizers (llama-bpe): say what transformers does
        ids = tokenizer("a")["input_ids"]
        writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])


def llama_cpp_graph(model: nn.Module) -> tuple[GGUFArchitecture, torch.Tensor | None]:
    """The llama.cpp graph that computes `model` as transformers does, and its rope frequency factors
    (None: unscaled); refused, with the way round, where no graph does."""
    config = model.config
    if config.model_type not in GGUF_ARCHITECTURES:
        raise TunelabError(
            f"GGUF export writes {', '.join(GGUF_ARCHITECTURES)} models; this one is "
            f"{config.model_type}: {CONVERT_HINT}"
        )
    graph = GGUF_ARCHITECTURES[config.model_type]
    architecture, biases = graph.name, graph.biases
    frequency_factors = rope_frequency_factors(config)
    if frequency_factors is not None and architecture != "llama":
        raise TunelabError(f"GGUF export writes rope scaling for Llama models only; {CONVERT_HINT}")
    other_biases = [
        name
        for name, _ in model.named_parameters()
        if name.endswith(".bias") and not name.removesuffix(".bias").endswith(biases)
    ]
    if other_biases:
        raise TunelabError(
            f"GGUF export: llama.cpp's {architecture} graph has no {other_biases[0]} (a bias); {CONVERT_HINT}"
        )
    window = _sliding_window(config)
    if window:
        raise TunelabError(
            f"GGUF export: this model attends through a sliding window of {window} tokens, which llama.cpp's "
            f"{architecture} graph does not (it would attend to every earlier token); export --format merged "
            "and serve it with transformers or vLLM"
        )
    return graph, frequency_factors


def write_gguf(
    model: nn.Module, tokenizer, tokenizer_dir: Path, out_file: Path, gguf_type: str, pre: str | None
) -> None:
    """Write `model` (a merged HF model of GGUF_ARCHITECTURES) and `tokenizer` (saved in `tokenizer_dir`)
    as one GGUF file: 2-D weights as `gguf_type` (f16 or q8_0), norms and biases in f32."""
    import gguf

    config = model.config
    (architecture, interleaved, _), frequency_factors = llama_cpp_graph(model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    quantized = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    writer = gguf.GGUFWriter(str(out_file), architecture)
    writer.add_name(out_file.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope(config)[1])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # Qwen3's heads are not hidden_size / heads wide
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_to_gguf(writer, tokenizer, tokenizer_dir, config.vocab_size, pre)

    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output projection from token_embd when output is absent
        data = tensor.detach().float()
        if interleaved and ".self_attn.q_proj." in name:
            data = interleave_rope_rows(data, heads)
        elif interleaved and ".self_attn.k_proj." in name:
            data = interleave_rope_rows(data, kv_heads)
        array = data.numpy()
        kind = quantized if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # q8_0 packs rows in blocks of 32
        packed = gguf.quants.quantize(array, kind)
        writer.add_tensor(gguf_tensor_name(name), packed, raw_shape=packed.shape, raw_dtype=kind)
    if frequency_factors is not None:
        writer.add_tensor("rope_freqs.weight", frequency_factors.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# llama.cpp's pre-tokenizers that split text by one regex before byte-level BPE, by that regex
# (the pattern of a Hugging Face tokenizer's Split pre-tokenizer)
SPLIT_PRE_TOKENIZERS = {
    # Llama 3, 3.1, 3.2: digits in threes
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2, Qwen2.5, Qwen3: one digit at a time
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
# those that also take a word found whole in the vocabulary as one token, without its merges: a
# tokenizer.json's `"ignore_merges": true` (Llama 3's)
IGNORE_MERGES = ("llama-bpe",)


def split_pattern(pre_tokenizer_state: dict) -> str | None:
    """The regex of a pre-tokenizer that is one regex Split (isolating its matches) then byte-level
    mapping with no regex or prefix space of its own, as Llama 3's and Qwen2's are; else None."""
    steps = pre_tokenizer_state.get("pretokenizers", [])
    if pre_tokenizer_state.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") == "Split"
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("add_prefix_space") is False
        and byte_level.get("use_regex") is False
    ):
        return split.get("pattern", {}).get("Regex")
    return None


def known_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's pre-tokenizer name for this tokenizer: that of a built-in model (whose GGUF names
    it) with the same pre-tokenizer, or of SPLIT_PRE_TOKENIZERS by its regex; None lets llama.cpp use
    its default rules."""
    if not tokenizer.is_fast:
        return None
    mine = tokenizer.backend_tokenizer.pre_tokenizer.__getstate__()
    by_pattern = SPLIT_PRE_TOKENIZERS.get(split_pattern(json.loads(mine)))
    ignores_merges = bool(json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("ignore_merges"))
    if by_pattern and (by_pattern in IGNORE_MERGES) == ignores_merges:
        return by_pattern
    return next((name for state, name in _builtin_pre_tokenizers() if state == mine), None)


@functools.cache  # reading a tokenizer out of a GGUF takes seconds
def _builtin_pre_tokenizers() -> list[tuple[bytes, str | None]]:
    """Each built-in model's pre-tokenizer state and the name its GGUF gives it."""
    import gguf
    from transformers import AutoTokenizer

    from tunelab.models import BUILTIN_MODELS, builtin_gguf

    known = []
    for model in BUILTIN_MODELS:
        path = builtin_gguf(model)
        # the tokenizer straight from the GGUF: no conversion of the built-in model just to compare
        theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if theirs.is_fast:
            field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
            known.append(
                (theirs.backend_tokenizer.pre_tokenizer.__getstate__(), field.contents() if field else None)
            )
    return known
