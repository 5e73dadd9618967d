"""A tiny llama-architecture GGUF with random weights, for a real llama.cpp server in tests.

The vocabulary is byte-level BPE restricted to printable ASCII (plus GPT-2's space and newline
symbols, a few merges and the ChatML specials), so every token the model emits decodes to valid
UTF-8. With the same seed the weights, hence the text at temperature 0, are always the same.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

SPACE, NEWLINE = "\u0120", "\u010a"  # GPT-2's byte-level symbols for " " and "\n"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = (
    (SPACE, "t"),
    ("h", "e"),
    (SPACE + "t", "he"),
    (SPACE, "a"),
    ("i", "n"),
    (SPACE, "s"),
    ("e", "r"),
    ("o", "n"),
    ("a", "n"),
    ("r", "e"),
    (SPACE, "w"),
    ("o", "r"),
    ("e", "n"),
    (SPACE, "o"),
    ("i", "s"),
    ("a", "t"),
    ("e", "s"),
    ("i", "t"),
    ("a", "r"),
    ("e", "d"),
    (SPACE, "c"),
    (SPACE, "b"),
    (SPACE, "f"),
    ("o", "u"),
    ("l", "e"),
    (SPACE, "m"),
    ("n", "d"),
    (SPACE, "p"),
    (SPACE, "i"),
    ("a", "l"),
    ("in", "g"),
    (SPACE + "a", "nd"),
    ("o", "f"),
    (SPACE + "o", "f"),
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = [chr(c) for c in range(0x21, 0x7F)] + [SPACE, NEWLINE]
    tokens += [a + b for a, b in _MERGES]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += list(SPECIALS)
    types += [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens, [int(t) for t in types]


def end_token_ids() -> list[int]:
    """The ids of the specials, to bias away when a test needs ``finish_reason: length``."""
    tokens, _ = vocabulary()
    return [tokens.index(s) for s in SPECIALS]


def write_tiny_llama(
    path: Path, *, width: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """Write the model to ``path``; ``width`` scales its size and so its speed."""
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    vocab = len(tokens)
    ff = width * 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(width // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in _MERGES])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    ones = np.ones(width, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(vocab, width))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weight(vocab, width))
    for n in range(layers):
        prefix = f"blk.{n}."
        writer.add_tensor(prefix + "attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(prefix + name + ".weight", weight(width, width))
        writer.add_tensor(prefix + "ffn_norm.weight", ones)
        writer.add_tensor(prefix + "ffn_gate.weight", weight(ff, width))
        writer.add_tensor(prefix + "ffn_up.weight", weight(ff, width))
        writer.add_tensor(prefix + "ffn_down.weight", weight(width, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
