"""Calibration: per-layer second moments of the attention input, propagated layer by layer.

For every decoder layer we accumulate, in fp64, C_x = sum over tokens of x^T x (x = the attention
input after input RMSNorm, weight included) and sum |x| (ASVD's input scaling). Qwen3's keys and
queries are nonlinear in x (per-head k_norm/q_norm), so for it we also accumulate the moments of the
real post-norm keys (sum k^T k) and per-head queries (sum q_h^T q_h), before RoPE.

As soon as a layer is done, its [D, D] C_x is reduced to what the conversion reads, all small
[out, out] moments in the attention's own output space (converter/factorize.py: every factor's
latent is a map of its target's outputs, so the whole factorization and its error need only those):
  * `ck` = key moment [g*d_h, g*d_h]: W_K C_x W_K^T (Llama) or the post-k_norm keys' (Qwen3);
  * `cv` = value moment W_V C_x W_V^T [g*d_h, g*d_h];
  * `ckv` = key/value cross moment [g*d_h, g*d_h]: W_K C_x W_V^T (Llama) or sum k v^T of the post-k_norm keys
    and the values W_V x (Qwen3, accumulated during the forward: its keys are not linear in x). What a latent
    shared by keys and values (care-convert --latent joint) is fitted with;
  * `qc` = per-head query moments [n_h, d_h, d_h]: W_Q,h C_x W_Q,h^T (Llama) or post-q_norm (Qwen3);
  * `ax` = sum |x| [D], `x_scale` = mean(diag C_x) (the damping's scale);
  * with q/k biases (Qwen2), `qc` includes them, and so does `ck_rope`, the keys as RoPE rotates them (the
    rope map's), while `ck` and `cv` stay the moments of W x, the part the latents carry (the key bias's
    NoPE part and the value bias leave the attention exactly: converter/assemble.py). Those need
    sum x over the tokens, accumulated beside C_x.
Why: C_x is hidden^2 x 8 bytes per layer (134 MB for Llama-3-8B, 537 MB for 70B: 43 GB over 80 layers
if all were kept until the rope map, which needs every layer's key moment); the reduced statistics are
~20 MB a layer for either, so one C_x at a time is all the converter ever holds.

Propagation runs through the ORIGINAL layers, one layer on the device at a time; the statistics are
therefore independent of method/ranks/ratio/objective, which lets one calibration serve many
conversions (`stats_cache`). On CUDA the hidden states stay on the device when they fit in a quarter
of its free memory (a round trip to host RAM per layer costs more than the layer's forward for 8B
shapes), and fp32 layer forwards use TF32 matmuls (the statistics are accumulated in fp64 from the
fp32 outputs either way); `dtype=torch.bfloat16` runs the layers in bf16 instead.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .attention_weights import llama_query_cov

STATS_VERSION = 4   # 4: + the key/value cross moment; 3: output-space moments (2 held the whole C_x of every layer)


@dataclass
class LayerStats:
    ck: torch.Tensor    # [g*d_h, g*d_h] fp64 key moment (pre-RoPE; of W_K x alone for a biased source)
    cv: torch.Tensor    # [g*d_h, g*d_h] fp64 value moment (of W_V x)
    qc: torch.Tensor    # [n_h, d_h, d_h] fp64 per-head query moments (pre-RoPE; biases included)
    ax: torch.Tensor    # [D] fp64 sum of |x|
    x_scale: float      # mean(diag C_x)
    ck_rope: torch.Tensor | None = None   # key moment with the key bias (None: no bias, = ck): what RoPE rotates
    ckv: torch.Tensor | None = None       # [g*d_h, g*d_h] fp64 key/value cross moment (None: stats from before it)

    @property
    def rotated_key_moment(self) -> torch.Tensor:
        """The moment of the keys as RoPE rotates them (the rope map's): with the key bias. The K latent is
        fitted to `ck`, without it: the bias's NoPE part is dropped exactly (converter/assemble.py)."""
        return self.ck if self.ck_rope is None else self.ck_rope

    @property
    def qd(self) -> torch.Tensor:
        """[n_h, d_h]: sum of squares of each pre-RoPE query dim (what the rope selection ranks by)."""
        return self.qc.diagonal(dim1=1, dim2=2)


@dataclass
class CalibStats:
    layers: list[LayerStats]
    tokens: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "meta": self.meta, "layers": [vars(s) for s in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibStats":
        return cls([LayerStats(**s) for s in d["layers"]], d["tokens"], d.get("meta", {}))


def reduce_layer(cx: torch.Tensor, ax: torch.Tensor, attn: torch.nn.Module, num_heads: int,
                 ck: torch.Tensor | None = None, qc: torch.Tensor | None = None,
                 sx: torch.Tensor | None = None, tokens: int = 0, ckv: torch.Tensor | None = None) -> LayerStats:
    """One layer's C_x reduced to output space (on C_x's device; the result on the CPU). `attn` is the
    source's attention module (its stored weights, exact in fp64); `ck`/`qc`/`ckv` are Qwen3's post-norm
    moments, computed from C_x and the linear maps when not given (Llama). A Llama-path source with
    q/k biases (Qwen2) adds them from `sx` = sum x over the `tokens` tokens: E[(Wx+b)(Wx+b)^T] = W C W^T
    + (W sx) b^T + b (W sx)^T + tokens b b^T, to the queries and to the keys RoPE rotates (`ck_rope`)."""
    def w(name):
        return getattr(attn, name).weight.detach().to(cx.device, torch.float64)

    def b(name):
        bias = getattr(attn, name).bias
        return None if bias is None else bias.detach().to(cx.device, torch.float64)

    wv = w("v_proj")
    cv = wv @ cx @ wv.T
    ck_rope = None
    if ck is None:
        wk = w("k_proj")
        wk_cx = wk @ cx
        ck = wk_cx @ wk.T
        ckv = (wk_cx @ wv.T).cpu()
        bk = b("k_proj")
        if bk is not None:
            ck_rope = _with_bias(ck[None], (wk @ sx)[None], bk[None], tokens)[0].cpu()
    if qc is None:
        wq, bq = w("q_proj"), b("q_proj")
        qc = llama_query_cov(wq, cx, num_heads)
        if bq is not None:
            qc = _with_bias(qc, (wq @ sx).view(num_heads, -1), bq.view(num_heads, -1), tokens)
    return LayerStats(ck=ck.cpu(), cv=cv.cpu(), qc=qc.cpu(), ax=ax.cpu(), x_scale=cx.diagonal().mean().item(),
                      ck_rope=ck_rope, ckv=None if ckv is None else ckv.cpu())


def _with_bias(moment: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor, tokens: int) -> torch.Tensor:
    """Second moments [H, d, d] of W x over tokens -> of W x + b, given W sum(x) `ws` [H, d] and b [H, d]."""
    cross = torch.einsum("hd,he->hde", ws, bias)
    return moment + cross + cross.transpose(1, 2) + tokens * torch.einsum("hd,he->hde", bias, bias)


def hidden_home(device: str, nbytes: int) -> str:
    """Where the propagated hidden states wait between layers: the device if they fit comfortably."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if nbytes < free // 4:
            return device
    return "cpu"


def working_copy(layer: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The layer itself moved to `device` (lossless), or a cast copy when `dtype` differs: the source
    weights must stay untouched, the factorization reads them afterwards. Parameters already in `dtype`
    on `device` (streamed MoE experts) are shared with the copy, not copied."""
    if all(p.dtype == dtype for p in layer.parameters()):
        return layer.to(device)
    target = torch.device(device)
    ready = {id(p): p for p in layer.parameters() if p.dtype == dtype and p.device.type == target.type
             and target.index in (None, p.device.index)}
    return copy.deepcopy(layer, memo=ready).to(device=device, dtype=dtype)


def embedded_batches(embed: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: str,
                     dtype: torch.dtype, park: str) -> list[torch.Tensor]:
    """The token windows [N, T] embedded, in batches of `batch_size` windows, waiting on `park`."""
    embed.to(device)
    try:
        return [embed(windows[i:i + batch_size].to(device)).to(dtype).to(park)
                for i in range(0, windows.shape[0], batch_size)]
    finally:
        embed.cpu()


@contextlib.contextmanager
def matmul_precision(device: str):
    """TF32 matmuls for fp32 layer forwards on CUDA (8B shapes: ~4x faster); CPU unchanged."""
    if not str(device).startswith("cuda"):
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def layer_forward(layer: torch.nn.Module, h: torch.Tensor, pos: torch.Tensor, rotary, device: str) -> torch.Tensor:
    """A source decoder layer on hidden states `h` [B, T, D] at positions `pos` [1, T] (causal, no padding),
    with the source's rotary embedding: its output hidden states. What calibration, the o_proj refit and the
    --k-share auto scoring advance the original model's stream by."""
    p = pos.expand(h.shape[0], -1)
    with matmul_precision(device):
        out = layer(h, attention_mask=causal_mask(layer, h), position_ids=p, position_embeddings=rotary(h, p))
    return out[0] if isinstance(out, tuple) else out


def causal_mask(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a source layer needs to be causal on `h` [B, T, D]: none for SDPA (and flash attention),
    which read a missing mask as causal, and an additive [1, 1, T, T] one (0 on and below the diagonal, the dtype's
    minimum above) for eager attention, which reads a missing mask as "attend to everything". Why: a source whose
    config.json names "eager" (attn_implementation) loads with it, and its calibration saw every later token
    (measured on a tiny random Llama: key moments of layers 1-5 off by 34-55 % relative, KL to the original 9.30
    instead of 7.15 at KV 0.5)."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    if getattr(config, "_attn_implementation", None) != "eager":
        return None
    t = h.shape[1]
    above = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
    return torch.zeros(1, 1, t, t, dtype=h.dtype, device=h.device).masked_fill(above, torch.finfo(h.dtype).min)


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, arch: str, device: str = "cpu", batch_size: int = 8,
                  dtype: torch.dtype = torch.float32, layer_in_memory=None) -> CalibStats:
    """Run `windows` [N, T] through `model` layer by layer and return per-layer statistics.
    `layer_in_memory(l, dtype, device)`: a context manager during which layer l holds all its weights
    (load.Source's: a Qwen3-MoE source loaded without its experts reads them in for the layer's forward,
    directly in the working dtype on the device)."""
    inner = model.model
    n, t = windows.shape
    pos = torch.arange(t, device=device).unsqueeze(0)
    park = hidden_home(device, n * t * inner.config.hidden_size * torch.finfo(dtype).bits // 8)
    hidden = embedded_batches(inner.embed_tokens, windows, batch_size, device, dtype, park)
    rotary = inner.rotary_emb.to(device)

    stats: list[LayerStats] = []
    for l, src_layer in enumerate(tqdm(inner.layers, desc="calibrate", unit="layer")):
        with layer_in_memory(l, dtype, device) if layer_in_memory else contextlib.nullcontext():
            acc = _propagate(src_layer, hidden, arch, device, dtype, park, rotary, pos)
        stats.append(reduce_layer(acc["cx"], acc["ax"], src_layer.self_attn, model.config.num_attention_heads,
                                  acc["ck"], acc["qc"], acc["sx"], acc["n"], acc["ckv"]))
        acc.clear()   # this layer's C_x goes now
    rotary.cpu()
    return CalibStats(stats, n * t)


def _propagate(src_layer, hidden: list, arch: str, device: str, dtype: torch.dtype, park: str, rotary,
               pos: torch.Tensor) -> dict:
    """Run every batch of `hidden` through one layer (replacing them by its outputs) and return the
    layer's accumulated moments {cx, ax, sx, n, ck, qc, ckv}."""
    layer = working_copy(src_layer, device, dtype)
    d = layer.input_layernorm.weight.shape[0]
    acc = {"cx": torch.zeros(d, d, dtype=torch.float64, device=device),
           "ax": torch.zeros(d, dtype=torch.float64, device=device),
           "sx": torch.zeros(d, dtype=torch.float64, device=device), "n": 0, "ck": None, "qc": None, "ckv": None}
    # Qwen3: the values of the batch's tokens (W_V x, the source's exact weights in fp64) wait for its post-norm
    # keys, which the k_norm hook pairs them with (sum k v^T)
    wv = src_layer.self_attn.v_proj.weight.detach().to(device, torch.float64) if arch == "qwen3" else None

    def on_norm(_m, _i, out):
        x = out.reshape(-1, out.shape[-1]).double()
        acc["cx"].addmm_(x.T, x)
        acc["ax"].add_(x.abs().sum(0))
        acc["sx"].add_(x.sum(0))
        acc["n"] += x.shape[0]
        if wv is not None:
            acc["v"] = x @ wv.T

    def on_knorm(_m, _i, out):  # [B, T, g, d_h] post-norm keys, before RoPE
        k = out.reshape(out.shape[0] * out.shape[1], -1).double()
        acc["ck"] = k.T @ k if acc["ck"] is None else acc["ck"].addmm_(k.T, k)
        v = acc.pop("v")
        acc["ckv"] = k.T @ v if acc["ckv"] is None else acc["ckv"].addmm_(k.T, v)

    def on_qnorm(_m, _i, out):  # [B, T, n_h, d_h] post-norm queries, before RoPE
        q = out.double()
        qq = torch.einsum("bthd,bthe->hde", q, q)
        acc["qc"] = qq if acc["qc"] is None else acc["qc"].add_(qq)

    hooks = [layer.input_layernorm.register_forward_hook(on_norm)]
    if arch == "qwen3":
        hooks.append(layer.self_attn.k_norm.register_forward_hook(on_knorm))
        hooks.append(layer.self_attn.q_norm.register_forward_hook(on_qnorm))
    try:
        for i, h in enumerate(hidden):
            hidden[i] = layer_forward(layer, h.to(device), pos, rotary, device).to(park)
    finally:
        for hk in hooks:
            hk.remove()
        if layer is src_layer:
            layer.cpu()
        del layer
    return acc
