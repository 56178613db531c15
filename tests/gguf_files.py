"""A tiny GGUF file written from a tiny transformers folder, so the GGUF loading paths (care-eval,
care-convert, converter/gguf_cache.py) run on a file whose correct tensors and outputs are known: the
folder's."""
from __future__ import annotations

import json
from pathlib import Path


def write_gguf(src: Path, path: Path, license: str | None = None) -> Path:
    """An F32 GGUF of a tiny Qwen3 folder (llama.cpp's tensor names via the gguf package; the
    llama3 BPE tokenizer stored as "gpt2"/"llama-bpe"), so the GGUF loading path is exercised on a
    file whose correct perplexity is known: the source folder's."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    tj = json.loads((src / "tokenizer.json").read_text())
    V = cfg["vocab_size"]
    tokens, types = [f"<unused{i}>" for i in range(V)], [5] * V
    for t, i in tj["model"]["vocab"].items():
        if i < V:
            tokens[i], types[i] = t, 1
    for a in tj.get("added_tokens", []):
        if a["id"] < V:
            tokens[a["id"]], types[a["id"]] = a["content"], 3
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    if license is not None:
        w.add_license(license)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, cfg["num_hidden_layers"])
    for k, v in load_file(str(src / "model.safetensors")).items():
        w.add_tensor(names.get_name(k, try_suffixes=(".weight",)), v.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
