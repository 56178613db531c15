"""Fast checks of the vLLM plugin pieces (no server): version gate, registration, the PyTorch
paged latent decode (joint and key/value split) and the GPU gather fallback against naive
references, the CPU prefill kernels (paged and flash) and the KV write against vLLM's own
CPU_SDPA_MLA / CPU_MLA code, and the explicit checkpoint name/shape table against a real
conversion."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("vllm")


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.26.0+cu128", "not-a-version"])
def test_version_check_rejects_unsupported(version):
    from care_vllm import UnsupportedVLLMVersion, check_vllm_version

    with pytest.raises(UnsupportedVLLMVersion) as e:
        check_vllm_version(version)
    msg = str(e.value)
    assert version in msg and ">=0.32.0" in msg and "<0.33" in msg, msg


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.1", "0.32.2rc1.dev7+gabc"])
def test_version_check_accepts_supported(version):
    from care_vllm import check_vllm_version

    assert check_vllm_version(version) == version


def test_installed_vllm_is_supported():
    from care_vllm import check_vllm_version

    check_vllm_version()


UNDER_ANOTHER_VLLM = """
import sys
import vllm
vllm.__version__ = "0.33.0"   # (as after `pip install -U vllm` beside care-vllm)
from vllm.engine.arg_utils import EngineArgs
for model in sys.argv[1:]:
    try:
        print("RESULT", model, "built",
              EngineArgs(model=model, dtype="float32").create_engine_config().model_config.architectures)
    except Exception as e:
        print("RESULT", model, "refused", type(e).__name__)
"""


def test_an_unsupported_vllm_refuses_care_models_only(tmp_path, calib_file):
    """Outside the supported range the plugin warns and refuses care_mla checkpoints with the reason, and vLLM
    still builds stock models: vLLM loads every installed plugin for every model and does not catch their errors,
    so the plugin's exception had stopped every `vllm serve`. (The faked version holds in this process only: the
    model-inspection subprocess vLLM starts sees the real one, so its message names 0.32 there.)"""
    import subprocess
    import sys

    from converter.pipeline import convert
    from tests.tiny_models import make_tiny_original
    from tests.vllm_server import ROOT

    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2)
    convert(src, tmp_path / "mla", calib_files=[calib_file], kv_ratio=0.5, rope_dim=8, calib_samples=4,
            calib_seqlen=32)
    proc = subprocess.run([sys.executable, "-c", UNDER_ANOTHER_VLLM, str(src), str(tmp_path / "mla")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr   # (vLLM logs to stdout)
    results = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [f"{src} built ['LlamaForCausalLM']", f"{tmp_path / 'mla'} refused ValidationError"], log[-3000:]
    assert "care_vllm supports vllm>=0.32.0,<0.33, but vLLM 0.33.0 is installed. Install a supported vLLM" in log
    assert "care_mla checkpoints cannot be served; other models are served as usual" in log
    assert "care_vllm.UnsupportedVLLMVersion: care_vllm supports vllm>=0.32.0,<0.33" in log, log[-3000:]


def test_register_is_idempotent_and_registers_everything():
    import care_vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS

    care_vllm.register()
    care_vllm.register()
    assert "care_mla" in MODEL_ARCH_CONFIG_CONVERTORS
    assert {"CareLlamaForCausalLM", "CareQwen3ForCausalLM"} <= set(ModelRegistry.get_supported_archs())
    cfg = AutoConfig.for_model("care_mla", qk_rope_head_dim=8, k_ranks=[8, 16], v_ranks=[24, 8],
                               num_hidden_layers=2, original_head_dim=16)
    conv = MODEL_ARCH_CONFIG_CONVERTORS["care_mla"](cfg, cfg)
    # widest layer: 8 + 24 latent + 8 rope
    assert conv.is_deepseek_mla() and conv.get_head_size() == 40 and conv.get_total_num_kv_heads() == 1


def test_rope_overrides_at_serve_time_are_refused(tmp_path, calib_file):
    """`vllm serve --hf-overrides '{"rope_scaling": {yarn...}}'` (Qwen3's documented long-context switch) works
    on the original; on a conversion, whose rope is fixed in its weights and config, vLLM would have taken
    the override and the model served unscaled rope: the plugin stops it with the way to do it instead."""
    from pydantic import ValidationError
    from vllm.config import ModelConfig

    import care_vllm
    from converter.pipeline import convert
    from tests.tiny_models import QWEN3_YARN, make_tiny_original

    care_vllm.register()
    src = make_tiny_original(tmp_path / "orig", "qwen3", num_layers=2)
    convert(src, tmp_path / "mla", calib_files=[calib_file], kv_ratio=0.5, rope_dim=8, calib_samples=4,
            calib_seqlen=32)
    yarn = {k: v for k, v in QWEN3_YARN.items() if k != "rope_theta"}
    overrides = {"rope_scaling": yarn, "max_position_embeddings": 4096}
    assert ModelConfig(model=str(src), hf_overrides=overrides).max_model_len == 4096
    assert ModelConfig(model=str(tmp_path / "mla")).max_model_len == 1024
    with pytest.raises(ValidationError, match="care_mla checkpoints do not take rope_parameters overrides.*"
                                              "care-convert SRC OUT --hf-overrides"):
        ModelConfig(model=str(tmp_path / "mla"), hf_overrides=overrides)
    # what does not touch the rope still goes through
    assert ModelConfig(model=str(tmp_path / "mla"), hf_overrides={"max_position_embeddings": 4096}).max_model_len \
        == 4096


def _dense_latent_attention(q, rows, scale, r):
    s = (q.double() @ rows.double().T) * scale            # [N, T]
    return torch.softmax(s, -1) @ rows[:, :r].double()    # [N, r]


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},   # vLLM serves the source at 2 x 1024
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "default", "rope_theta": 10000.0}], ids=lambda r: r["rope_type"])
def test_vllm_gives_the_converted_model_the_sources_context_length(tmp_path, calib_file, rope):
    """`vllm serve` without --max-model-len: vLLM's own ModelConfig derives the same max_model_len for the
    converted checkpoint as for its source. (A converted config has no rope scaling for vLLM to multiply
    by: with the source's max_position_embeddings a linear-scaled source's conversion got half its context.)"""
    from vllm.config import ModelConfig   # before the plugin: vllm.plugins first is a circular import

    import care_vllm
    from converter.pipeline import convert
    from tests.tiny_models import make_tiny_original

    care_vllm.register()
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2, rope=rope)
    convert(src, tmp_path / "mla", calib_files=[calib_file], kv_ratio=0.5, rope_dim=8, calib_samples=4,
            calib_seqlen=32)
    lengths = [ModelConfig(model=str(p)).max_model_len for p in (src, tmp_path / "mla")]
    assert lengths[0] == (2048 if rope["rope_type"] == "linear" else 1024), lengths
    assert lengths[1] == lengths[0], lengths


@pytest.mark.parametrize("width,rope,block", [(27, 8, 16), (53, 8, 16), (100, 36, 5)])
def test_paged_latent_decode_matches_dense(width, rope, block):
    from care_vllm.backends.cpu import paged_latent_decode

    g = torch.Generator().manual_seed(width)
    r = width - rope
    num_blocks, B, N = 40, 3, 4
    cache = torch.randn(num_blocks, block, width, generator=g)
    seq_lens = torch.tensor([1, 2 * block + 3, 5 * block])
    max_blocks = (int(seq_lens.max()) + block - 1) // block
    block_table = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)]).int()
    q = torch.randn(B, N, width, generator=g)
    out = paged_latent_decode(q, cache, block_table, seq_lens.int(), 0.3, r)
    assert out.shape == (B, N, r)
    for b in range(B):
        pos = torch.arange(int(seq_lens[b]))
        rows = cache[block_table[b, pos // block].long(), pos % block]
        ref = _dense_latent_attention(q[b], rows, 0.3, r)
        assert (out[b].double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("k_rank,v_rank,rope,block", [(5, 14, 8, 16), (20, 7, 36, 5)])
def test_paged_latent_decode_key_value_split_matches_dense(k_rank, v_rank, rope, block):
    """The split decode (scores over [c_K | k_pe], values c_V) equals the joint one with a query
    that is zero on c_V; its output is the c_V part (the joint one's c_K part is zero)."""
    from care_vllm.backends.cpu import latent_decode, paged_latent_decode, plan_latent_decode

    g = torch.Generator().manual_seed(k_rank)
    r = k_rank + v_rank
    num_blocks, B, N = 30, 3, 4
    cache = torch.randn(num_blocks, block, r + rope, generator=g)
    seq_lens = torch.tensor([3 * block + 1, 1, 4 * block])
    max_blocks = (int(seq_lens.max()) + block - 1) // block
    block_table = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)]).int()
    q_k, q_pe = torch.randn(B, N, k_rank, generator=g), torch.randn(B, N, rope, generator=g)
    out = paged_latent_decode(torch.cat([q_k, q_pe], -1), cache, block_table, seq_lens.int(), 0.3, r,
                              k_rank=k_rank)
    assert out.shape == (B, N, v_rank)
    # vLLM's MLA layer hands the query over as the pair (ql_nope, rope(q_pe)): same result
    plan = plan_latent_decode(block_table, seq_lens.int(), block)
    assert torch.equal(latent_decode((q_k, q_pe), cache, plan, 0.3, r, k_rank=k_rank), out)
    q_joint = torch.cat([q_k, torch.zeros(B, N, v_rank), q_pe], -1)
    for b in range(B):
        pos = torch.arange(int(seq_lens[b]))
        rows = cache[block_table[b, pos // block].long(), pos % block]
        ref = _dense_latent_attention(q_joint[b], rows, 0.3, r)
        assert (out[b].double() - ref[:, k_rank:]).abs().max() < 1e-5


@pytest.mark.parametrize("k_rank", [None, 6])
@pytest.mark.parametrize("first_q_len", [1, 2])
@pytest.mark.parametrize("group_cost", [None, 0])
def test_paged_latent_decode_several_new_tokens_per_request_is_causal(k_rank, first_q_len, group_cost, monkeypatch):
    """Speculative decoding's verify step, or a short prompt (chunk) over cached context: request b
    brings n_b new tokens (the last n_b of its seq_lens[b], already in the cache); new token j must see
    exactly the first seq_lens[b] - n_b + j + 1 cached rows. Requests of 1 (or 2), 4 and 3 new tokens
    (the last one a short prompt: its whole sequence is new) against dense attention per token. At
    these small contexts padding is cheaper than a group: one group, each request padded to 4 new
    tokens; with GROUP_COST_ROWS = 0 (`group_cost`) every request is a group of its own."""
    from care_vllm.backends.cpu import latent_decode, paged_latent_decode, plan_latent_decode

    if group_cost is not None:
        monkeypatch.setattr("care_vllm.backends.cpu.GROUP_COST_ROWS", group_cost)
    g = torch.Generator().manual_seed(7)
    rope, block, num_blocks, N = 8, 16, 30, 4
    r = 21
    cache = torch.randn(num_blocks, block, r + rope, generator=g)
    seq_lens = torch.tensor([2 * block + 5, block + 4, 3])
    q_lens = torch.tensor([first_q_len, 4, 3])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int()
    max_blocks = (int(seq_lens.max()) + block - 1) // block
    block_table = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(3)]).int()
    width = r + rope if k_rank is None else k_rank + rope
    q = torch.randn(int(q_lens.sum()), N, width, generator=g)
    out = paged_latent_decode(q, cache, block_table, seq_lens.int(), 0.3, r, k_rank=k_rank, query_start_loc=qsl)
    assert out.shape == (q.shape[0], N, r if k_rank is None else r - k_rank)
    nope = r if k_rank is None else k_rank      # the (ql_nope, rope(q_pe)) pair vLLM passes: same result
    plan = plan_latent_decode(block_table, seq_lens.int(), block, qsl)
    assert len(plan.groups) == (1 if group_cost is None else 3)
    assert torch.equal(latent_decode((q[..., :nope], q[..., nope:]), cache, plan, 0.3, r, k_rank=k_rank), out)
    # long contexts: the score matrix is computed a few query rows at a time, with the same result
    monkeypatch.setattr("care_vllm.backends.cpu.SCORES_BUDGET_BYTES", 4 * 3 * 48 * 5)   # 5 rows of 48 columns
    sliced = latent_decode((q[..., :nope], q[..., nope:]), cache, plan, 0.3, r, k_rank=k_rank)
    assert (sliced - out).abs().max() < 1e-6   # (not bit-equal: bmm's blocking follows the row count)
    _assert_causal_dense(out, q, cache, block_table, seq_lens, q_lens, 0.3, r, k_rank)


def _assert_causal_dense(out, q, cache, block_table, seq_lens, q_lens, scale, r, k_rank):
    """out [tokens, N, .] against dense attention per new token: request b's j-th new token sees the
    first seq_lens[b] - q_lens[b] + j + 1 cached rows."""
    block, N = cache.shape[1], q.shape[1]
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)])
    for b in range(len(seq_lens)):
        for j in range(int(q_lens[b])):
            t = int(qsl[b]) + j
            pos = torch.arange(int(seq_lens[b] - q_lens[b]) + j + 1)
            rows = cache[block_table[b, pos // block].long(), pos % block]
            if k_rank is None:
                ref = _dense_latent_attention(q[t], rows, scale, r)
            else:   # the joint form with a query that is zero on c_V
                q_joint = torch.cat([q[t, :, :k_rank], torch.zeros(N, r - k_rank), q[t, :, k_rank:]], -1)
                ref = _dense_latent_attention(q_joint, rows, scale, r)[:, k_rank:]
            assert (out[t].double() - ref).abs().max() < 1e-5, (b, j)


@pytest.mark.parametrize("k_rank", [None, 6])
@pytest.mark.parametrize("several", [False, True])
def test_latent_decode_groups_requests_whose_padding_would_cost_more_than_a_group(k_rank, several):
    """A decode over 1000 cached tokens beside ones over 30-40 would pad the short ones to 1000 masked
    rows, and a decode beside a 5-token prompt chunk to 5 query rows: the plan groups requests so that
    padding within a group costs less than a group (GROUP_COST_ROWS new-token x cached-row products per
    thread), each group padded to its own shape, with the output unchanged (dense reference per token)."""
    from care_vllm.backends.cpu import GROUP_COST_ROWS

    assert GROUP_COST_ROWS == 256    # the expected groups below are worked out for it, on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_grouped_decode(k_rank, several)
    finally:
        torch.set_num_threads(threads)


def _check_grouped_decode(k_rank, several):
    from care_vllm.backends.cpu import latent_decode, plan_latent_decode

    g = torch.Generator().manual_seed(11)
    rope, block, N, r = 8, 16, 3, 14
    seq_lens = torch.tensor([40, 1000, 30, 700, 200, 520])
    q_lens = torch.tensor([1, 1, 1, 1, 1, 1]) if not several else torch.tensor([2, 1, 3, 1, 4, 5])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int()
    max_blocks = (int(seq_lens.max()) + block - 1) // block
    num_blocks = len(seq_lens) * max_blocks + 4
    cache = torch.randn(num_blocks, block, r + rope, generator=g)
    block_table = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * max_blocks].view(len(seq_lens), -1).int()
    width = r + rope if k_rank is None else k_rank + rope
    q = torch.randn(int(q_lens.sum()), N, width, generator=g)
    plan = plan_latent_decode(block_table, seq_lens.int(), block, qsl if several else None)
    # by context, longest first; padding cost = the group's (requests x new tokens x context) growth
    # minus the request's own. One new token each: 700 into {1000} costs 300 -> {700}; 520 into {700}
    # 180; 200 into {700, 520} 500 -> {200}; 40 and 30 join it (160, 170).
    # Several: 700 (1 token) into {1000} 300 -> own; 520 (5 tokens) into {700} 3700 -> own; 200 (4)
    # into {520 x 5} 1800 -> own; 40 (2) into {200 x 4} 720 -> own; 30 (3) into {40 x 2} 70: joins.
    shapes = sorted((grp.bias.shape[0], grp.bias.shape[1], grp.bias.shape[3]) for grp in plan.groups)
    assert shapes == ([(1, 1, 1008), (2, 1, 704), (3, 1, 208)] if not several else
                      [(1, 1, 704), (1, 1, 1008), (1, 4, 208), (1, 5, 528), (2, 3, 48)]), shapes
    nope = r if k_rank is None else k_rank
    out = latent_decode((q[..., :nope], q[..., nope:]), cache, plan, 0.3, r, k_rank=k_rank)
    _assert_causal_dense(out, q, cache, block_table, seq_lens, q_lens, 0.3, r, k_rank)


@pytest.mark.parametrize("raw", ["0", "-3", "many", "1.5"])
def test_latent_prefill_tokens_rejects_bad_values(monkeypatch, raw):
    from care_vllm.backends.cpu import DEFAULT_LATENT_PREFILL_TOKENS, LATENT_PREFILL_ENV, latent_prefill_tokens

    monkeypatch.delenv(LATENT_PREFILL_ENV, raising=False)
    assert latent_prefill_tokens() == DEFAULT_LATENT_PREFILL_TOKENS
    monkeypatch.setenv(LATENT_PREFILL_ENV, "32")
    assert latent_prefill_tokens() == 32
    monkeypatch.setenv(LATENT_PREFILL_ENV, raw)
    with pytest.raises(ValueError, match=f"{LATENT_PREFILL_ENV}='{re.escape(raw)}': expected a whole number >= 1"):
        latent_prefill_tokens()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d_qk,d_v", [(24, 16), (16, 16), (8, 12)])
def test_flash_prefill_matches_vllm_cpu_sdpa_prefill(causal, d_qk, d_v):
    """care_vllm's CPU MLA prefill kernel (PyTorch's flash attention) against vLLM's own dense
    CPU_SDPA_MLA on ragged requests: outputs and the log-sum-exp the context merge uses."""
    from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend

    from care_vllm.backends.cpu_prefill import ragged_flash_attention

    g = torch.Generator().manual_seed(d_qk + d_v)
    q_lens = [5, 1, 37]
    kv_lens = q_lens if causal else [9, 40, 3]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    N = 3
    q = torch.randn(sum(q_lens), N, d_qk, generator=g)
    k = torch.randn(sum(kv_lens), N, d_qk, generator=g)
    v = torch.randn(sum(kv_lens), N, d_v, generator=g)
    stock = object.__new__(CPUSDPAMLAPrefillBackend)   # _ragged_sdpa reads only .scale
    stock.scale = 0.37
    want_out, want_lse = stock._ragged_sdpa(q, k, v, cu(q_lens), cu(kv_lens), causal, True)
    got_out, got_lse = ragged_flash_attention(q, k, v, cu(q_lens), cu(kv_lens), 0.37, causal, True)
    assert got_out.shape == want_out.shape == (sum(q_lens), N, d_v) and got_lse.shape == want_lse.shape
    assert (got_out - want_out).abs().max() < 1e-5 and (got_lse - want_lse).abs().max() < 1e-5
    only_out = ragged_flash_attention(q, k, v, cu(q_lens), cu(kv_lens), 0.37, causal, False)
    assert torch.equal(only_out, got_out)


@pytest.mark.parametrize("d_qk,d_v", [(24, 16), (128, 64), (200, 128), (8, 12)])
def test_paged_prefill_matches_vllm_cpu_sdpa_prefill(d_qk, d_v):
    """The new-token prefill through vLLM's paged CPU attention kernel (scratch cache, q/k/v padded
    to a head size the kernel is built for: 24 -> 32, 200 -> 224) against CPU_SDPA_MLA's dense causal
    attention, on ragged requests that end inside, at and one past a block boundary; the plan is
    reused by a second "layer" with other inputs, which must not see the first's."""
    from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend

    from care_vllm.backends.cpu_prefill import PagedPrefillPlan, kernel_head_size

    g = torch.Generator().manual_seed(d_qk)
    lens, N, block = [5, 1, 32, 33, 70], 3, 32
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    stock = object.__new__(CPUSDPAMLAPrefillBackend)
    stock.scale = 0.37
    plan = PagedPrefillPlan.build(cu, block_size=block)
    head_size = kernel_head_size(d_qk, d_v)
    assert head_size is not None and head_size >= max(d_qk, d_v)
    for layer in range(2):
        q, k = (torch.randn(sum(lens), N, d_qk, generator=g) for _ in range(2))
        v = torch.randn(sum(lens), N, d_v, generator=g)
        want = stock._ragged_sdpa(q, k, v, cu, cu, True, False)
        got = plan.attention(q, k, v, 0.37, head_size)
        assert got.shape == want.shape == (sum(lens), N, d_v)
        assert (got - want).abs().max() < 1e-4, layer


def _prefill_backends():
    """vLLM's dense CPU_SDPA_MLA, the plugin's CPU prefill, and deliberately broken variants."""
    import torch.nn.functional as F
    from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend

    from care_vllm.backends.cpu_prefill import CareCPUPrefillBackend

    class PaddedV(CPUSDPAMLAPrefillBackend):   # what the GPU FlashAttention path does: v padded to qk
        def _ragged_sdpa(self, q, k, v, *args, **kwargs):
            return super()._ragged_sdpa(q, k, F.pad(v, [0, q.shape[-1] - v.shape[-1]]), *args, **kwargs)

    class NotCausal(CPUSDPAMLAPrefillBackend):
        def _ragged_sdpa(self, q, k, v, q_cu, kv_cu, causal, return_softmax_lse):
            return super()._ragged_sdpa(q, k, v, q_cu, kv_cu, False, return_softmax_lse)

    class LseTokensFirst(CPUSDPAMLAPrefillBackend):
        def _ragged_sdpa(self, *args, **kwargs):
            result = super()._ragged_sdpa(*args, **kwargs)
            return (result[0], result[1].T.contiguous()) if isinstance(result, tuple) else result

    class QkScale(CPUSDPAMLAPrefillBackend):  # 1/sqrt(qk head dim) instead of the model's scale
        def _ragged_sdpa(self, q, *args, **kwargs):
            return super()._ragged_sdpa(q * (q.shape[-1] ** -0.5 / self.scale), *args, **kwargs)

    class Raises(CPUSDPAMLAPrefillBackend):
        def run_prefill_context_chunk(self, *args, **kwargs):
            raise RuntimeError("head dim not supported")

    return {"CPU_SDPA_MLA": (CPUSDPAMLAPrefillBackend, None), "care CPU": (CareCPUPrefillBackend, None),
            "v padded": (PaddedV, None), "not causal": (NotCausal, "new tokens: output differs"),
            "lse [T, H]": (LseTokensFirst, "new tokens with lse: lse shape"),
            "qk scale": (QkScale, "new tokens: output differs"),
            "raises": (Raises, "RuntimeError: head dim not supported")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nope,rope,v", [(64, 64, 64), (128, 96, 128), (32, 8, 24)])
def test_prefill_start_up_check_accepts_correct_backends_and_names_what_is_wrong(nope, rope, v, dtype):
    """The check the plugin runs before using FlashAttention for MLA prefill at head dims vLLM does not
    list (backends/prefill_check.py): it passes vLLM's CPU_SDPA_MLA itself, the plugin's CPU prefill
    (other kernels: vLLM's paged CPU attention, PyTorch's flash) and a backend returning v padded to
    the qk head dim, and fails, naming the call and the fault, a prefill without the causal mask, one
    with the log-sum-exp as [tokens, heads], one scaled by 1/sqrt(qk head dim), one that raises. Run
    once under a default-device context (vLLM builds models under one): it creates no tensor
    without naming its device."""
    from care_vllm.backends.prefill_check import check_prefill_backend

    scale = nope ** -0.5   # the source's softmax scale, as a conversion keeps it
    for name, (cls, fault) in _prefill_backends().items():
        backend = cls(num_heads=3, scale=scale, kv_lora_rank=40, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                      v_head_dim=v, vllm_config=None)
        if name == "CPU_SDPA_MLA":   # as vLLM calls it: inside a model's default-device context
            with torch.device("meta"):
                problem = check_prefill_backend(backend, dtype, "cpu")
        else:
            problem = check_prefill_backend(backend, dtype, "cpu")
        if fault is None:
            assert problem is None, (name, problem)
        else:
            assert problem is not None and problem.startswith(fault), (name, problem)


def test_kv_cache_write_matches_vllm_cpu_mla():
    """care_vllm's single-copy KV write equals CPU_MLA's, padding slots (-1) skipped."""
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

    from care_vllm.backends.cpu import CareCPUMLAImpl

    g = torch.Generator().manual_seed(0)
    r, rope, T = 19, 8, 6
    kv_c, k_pe = torch.randn(T, r, generator=g), torch.randn(T, 1, rope, generator=g)
    slots = torch.tensor([3, 40, -1, 17, 0, -1])
    ours, stock = torch.zeros(4, 16, r + rope), torch.zeros(4, 16, r + rope)
    CareCPUMLAImpl.do_kv_cache_update(object.__new__(CareCPUMLAImpl), kv_c, k_pe, ours, slots, "auto", None)
    CPUMLAImpl.do_kv_cache_update(object.__new__(CPUMLAImpl), kv_c, k_pe, stock, slots, "auto", None)
    assert torch.equal(ours, stock) and int((ours.abs().sum(-1) > 0).sum()) == 4


def test_gpu_backend_module_imports_and_torch_gather_is_exact():
    """The GPU module must import on CPU builds; its torch gather fallback is checked on CPU."""
    from care_vllm.backends import gpu

    assert issubclass(gpu.CareTritonMLABackend.get_builder_cls(), gpu.CareTritonMLAMetadataBuilder)
    g = torch.Generator().manual_seed(0)
    bs, width = 16, 72
    cache = torch.randn(30, bs, width, generator=g)
    block_table = torch.stack([torch.randperm(30, generator=g)[:6] for _ in range(2)]).int()
    lens, starts = [20, 33], [16, 5]
    cu = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32)
    dst = torch.zeros(60, width)
    gpu.torch_gather_cache(cache, dst, block_table, cu, torch.tensor(starts, dtype=torch.int32), sum(lens))
    row = 0
    for b in range(2):
        for j in range(lens[b]):
            p = starts[b] + j
            assert torch.equal(dst[row], cache[block_table[b, p // bs], p % bs])
            row += 1


def test_expected_checkpoint_shapes_match_a_conversion(tmp_path):
    """The plugin's explicit name/shape table equals what the converter writes (every variant)."""
    from safetensors import safe_open

    from care_vllm.config import register_config
    from care_vllm.models import expected_checkpoint_shapes
    from converter.pipeline import convert
    from tests.tiny_models import make_tiny_original
    from transformers import AutoConfig

    register_config()
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the latent cache of a key and a value"] * 300))
    for arch in ("llama", "qwen3", "qwen3_moe", "mixtral"):
        src = make_tiny_original(tmp_path / f"o_{arch}", arch, num_layers=2)
        out = tmp_path / f"m_{arch}"
        convert(src, out, calib_files=[calib], kv_ratio=0.75, rope_dim=8, calib_samples=4, calib_seqlen=32)
        found = {}
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                found.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
        cfg = AutoConfig.from_pretrained(out)
        assert json.loads((out / "config.json").read_text())["model_type"] == "care_mla"
        assert expected_checkpoint_shapes(cfg) == found


def _bare_model(cfg):
    """A CareXForCausalLM whose parameters are plain tensors named as in the real model (no engine):
    enough to run its load_weights (name mapping, shape checks, gate/up fusion)."""
    from torch.nn import Parameter

    from care_vllm.models import CareLlamaForCausalLM, CareQwen3ForCausalLM, expected_checkpoint_shapes

    cls = CareQwen3ForCausalLM if cfg.use_qk_norm else CareLlamaForCausalLM
    m = cls.__new__(cls)
    torch.nn.Module.__init__(m)
    m.config = cfg
    params = {}

    def fused_loader(p, w, shard):
        p.data.narrow(0, shard * w.shape[0], w.shape[0]).copy_(w)

    for name, shape in expected_checkpoint_shapes(cfg).items():
        if ".mlp.up_proj." in name:
            continue
        if ".mlp.gate_proj." in name:
            p = Parameter(torch.full((2 * shape[0], shape[1]), float("nan")), requires_grad=False)
            p.weight_loader = fused_loader
            params[name.replace(".mlp.gate_proj.", ".mlp.gate_up_proj.")] = p
        else:
            params[name] = Parameter(torch.full(shape, float("nan")), requires_grad=False)
    m.named_parameters = lambda: iter(params.items())
    return m, params


def test_load_weights_maps_every_tensor_and_names_bad_ones(tmp_path):
    from care_vllm.config import register_config
    from care_vllm.models import CareWeightError
    from converter.pipeline import convert
    from tests.tiny_models import checkpoint_tensors, make_tiny_original
    from transformers import AutoConfig

    register_config()
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the latent cache of a key and a value"] * 300))
    src = make_tiny_original(tmp_path / "o", "qwen3", num_layers=2)
    out = tmp_path / "m"
    convert(src, out, calib_files=[calib], kv_ratio=0.75, rope_dim=8, calib_samples=4, calib_seqlen=32)
    cfg = AutoConfig.from_pretrained(out)
    tensors = checkpoint_tensors(out)

    m, params = _bare_model(cfg)
    loaded = m.load_weights(iter(tensors.items()))
    assert loaded == set(params)
    assert all(not p.isnan().any() for p in params.values())
    gu = params["model.layers.1.mlp.gate_up_proj.weight"]
    I = tensors["model.layers.1.mlp.gate_proj.weight"].shape[0]
    assert torch.equal(gu[:I], tensors["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gu[I:], tensors["model.layers.1.mlp.up_proj.weight"])

    bad_name = "model.layers.1.self_attn.k_latent_proj.weight"
    missing = {k: v for k, v in tensors.items() if k != bad_name}
    with pytest.raises(CareWeightError, match=r"missing.*k_latent_proj"):
        _bare_model(cfg)[0].load_weights(iter(missing.items()))
    extra = {**tensors, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.zeros(3, 3)}
    with pytest.raises(CareWeightError, match=r"unexpected.*kv_a_proj_with_mqa"):
        _bare_model(cfg)[0].load_weights(iter(extra.items()))
    wrong = {**tensors, bad_name: tensors[bad_name][:-1]}
    with pytest.raises(CareWeightError, match=r"k_latent_proj.*shape"):
        _bare_model(cfg)[0].load_weights(iter(wrong.items()))
    codes = {**tensors, bad_name: tensors[bad_name].to(torch.int8)}   # quantized codes, config unquantized
    with pytest.raises(CareWeightError, match=r"k_latent_proj.*stored as torch.int8.*unquantized"):
        _bare_model(cfg)[0].load_weights(iter(codes.items()))


def test_cpu_lora_ops_give_tokens_without_an_adapter_no_delta():
    """vLLM marks a token whose request has no adapter with slot -1; its CPU LoRA ops (torch_ops.lora_ops) indexed
    the stacked adapters with it, so base requests batched with adapter requests got the last slot's adapter
    (care_vllm/cpu_lora_no_adapter.py). Reference: x A^T B^T * scale for the adapter's tokens, nothing for the
    others, through the sgmv path vLLM 0.32's CPU runner takes (the whole batch as one 'prefill')."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from care_vllm.cpu_lora_no_adapter import OPS, install

    torch.manual_seed(0)
    slots, rank, d_in, d_out, scale = 2, 4, 16, 12, 0.5
    a = torch.randn(slots, 1, rank, d_in)
    b = torch.randn(slots, 1, d_out, rank)
    seq = torch.tensor([3, 2, 4, 1])                 # four requests' tokens, in order
    slot = torch.tensor([1, -1, 0, -1])              # their adapters (-1: none)
    x = torch.randn(int(seq.sum()), d_in)
    base = torch.randn(int(seq.sum()), d_out)
    per_token = slot.repeat_interleave(seq)
    want = base.clone()
    for t, s in enumerate(per_token.tolist()):
        if s >= 0:
            want[t] += scale * (b[s, 0] @ (a[s, 0] @ x[t]))

    def run():
        starts = torch.cumsum(seq, 0) - seq
        latent = torch.zeros(len(x), rank)
        meta = (starts, seq, slot, len(seq), int(seq.max()), int(seq.sum()))
        lora_ops.sgmv_shrink(x, a, latent, *meta, scale)
        y = base.clone()
        lora_ops.sgmv_expand(latent, b, y, *meta, add_inputs=True)
        return y

    stock = {n: getattr(lora_ops, n) for n in OPS}
    if not any(getattr(f, "care_wrapped", False) for f in stock.values()):   # (a worker that has not installed it)
        wrong = run()
        assert (wrong - want)[per_token < 0].abs().max() > 0.1      # the last slot's adapter, on no-adapter tokens
    install()
    install()                                                       # (idempotent)
    assert all(getattr(lora_ops, n).care_wrapped and getattr(punica_cpu, n) is getattr(lora_ops, n) for n in OPS)
    torch.testing.assert_close(run(), want, rtol=1e-5, atol=1e-5)


def test_cpu_spec_decode_spreads_sampling_parameters_over_drafted_tokens():
    """vLLM's rejection sampler spreads each request's temperature, top-k and top-p over its drafted tokens with
    expand_batch_to_tokens; on CPU the kernel it launches wrote an int64 copy of a float or int32 output, leaving the
    real one uninitialized, so a batch with a sampled request divided every request's logits by garbage
    (care_vllm/cpu_spec_decode_sampling.py). Reference: each request's value repeated over its tokens, the greedy
    temperature 0 read as 1, by a loop; vLLM's own kernel gives it for int64 values, which it writes in place."""
    from vllm.platforms import current_platform
    from vllm.triton_utils.dispatcher import KernelOverride
    from vllm.v1.sample import rejection_sampler

    from care_vllm.cpu_spec_decode_sampling import expand_batch_to_tokens, install

    if not isinstance(rejection_sampler.expand_kernel, KernelOverride):   # (what a CPU worker does at start)
        current_platform.import_kernels()
        current_platform.register_triton_kernel_overrides()
    tokens = torch.tensor([4, 1, 3, 4, 2])            # five requests: 1 + drafted tokens each
    cu = torch.cumsum(tokens, 0).to(torch.int32)
    n = int(cu[-1])

    def reference(values, replace_from=0, replace_to=0):
        return torch.tensor([replace_to if v == replace_from else v for v, t in zip(values.tolist(), tokens.tolist())
                             for _ in range(t)], dtype=values.dtype)

    temperature = torch.tensor([0.0, 0.7, 0.0, 1.3, 0.0])
    top_k = torch.tensor([0, 5, 0, 40, 0], dtype=torch.int32)
    top_k64 = top_k.to(torch.int64)
    if rejection_sampler.expand_batch_to_tokens is not expand_batch_to_tokens:   # (a worker that has not installed it)
        wrong = rejection_sampler.expand_batch_to_tokens(temperature, cu, n, replace_from=0, replace_to=1)
        assert not torch.equal(wrong, reference(temperature, 0, 1))
        torch.testing.assert_close(rejection_sampler.expand_batch_to_tokens(top_k64, cu, n, 0, 7),
                                   reference(top_k64, 0, 7), rtol=0, atol=0)   # vLLM's kernel, on what it can write
    install()
    install()                                                                  # (idempotent)
    assert rejection_sampler.expand_batch_to_tokens is expand_batch_to_tokens
    for values, swap in ((temperature, (0, 1)), (top_k, (0, 0)), (top_k64, (0, 7))):
        got = rejection_sampler.expand_batch_to_tokens(values, cu, n, *swap)
        assert got.dtype == values.dtype
        torch.testing.assert_close(got, reference(values, *swap), rtol=0, atol=0)
