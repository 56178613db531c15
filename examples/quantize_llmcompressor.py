"""Quantize a care-convert checkpoint with llm-compressor, for `vllm serve` (W8A8 int8, FP8_DYNAMIC or W4A16).

Run it in llm-compressor's own environment, not in the one vLLM serves from: llm-compressor pins other
transformers and compressed-tensors versions than vLLM 0.32 (llmcompressor 0.14 wants transformers<=5.17 and
compressed-tensors 0.19; vllm 0.32 ships compressed-tensors 0.17), and it needs no vLLM:

    python -m venv ~/llmc && ~/llmc/bin/pip install llmcompressor
    ~/llmc/bin/python examples/quantize_llmcompressor.py out/smollm2-care-kv0.5 out/smollm2-care-kv0.5-w8a8
    vllm serve out/smollm2-care-kv0.5-w8a8

The checkpoint's own modeling code (trust_remote_code) builds the model, so this script needs nothing from this
repository. The stock recipe targets every nn.Linear except the LM head. That covers the latent projections
(kv_a_proj_with_mqa; Qwen3's k_latent_proj and v_latent_proj), q_proj, o_proj and the MLP. kv_b_proj and Qwen3's
q_rope_proj are not nn.Linear in the modeling code (model_defs.WeightMap), so they stay in float. vLLM reads their
weights directly: kv_b_proj is absorbed into the queries and outputs at load. The care_vllm plugin refuses a
checkpoint in which they were quantized. The schemes used here need no calibration data: their weights are
rounded to nearest, and their activations (W8A8, FP8_DYNAMIC) are quantized per token at run time. For GPTQ or
AWQ, pass a dataset to `oneshot` as llm-compressor's examples do. On a CPU, vLLM 0.32 runs W8A8 only: its FP8
kernels need AMX, and its W4A16 kernel is missing from the AVX2 build (docs/SERVING.md, "Quantized checkpoints").
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a care-convert output folder")
    p.add_argument("out", type=Path, help="where to write the quantized checkpoint (must not exist)")
    p.add_argument("--scheme", default="W8A8", choices=["W8A8", "FP8_DYNAMIC", "W4A16"],
                   help="llm-compressor preset scheme (default W8A8: int8 weights per channel, int8 activations "
                        "per token)")
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists")

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype="auto", trust_remote_code=True)
    recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe, trust_remote_code_model=True)
    model.save_pretrained(args.out, save_compressed=True)
    AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True).save_pretrained(args.out)
    for f in args.checkpoint.iterdir():   # the remote code, the conversion report, the model card...
        if f.is_file() and not (args.out / f.name).exists() and f.suffix != ".safetensors" \
                and f.name != "model.safetensors.index.json":
            shutil.copy(f, args.out / f.name)
    print(f"wrote {args.out}: vllm serve {args.out}")


if __name__ == "__main__":
    main()
