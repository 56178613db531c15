"""A deliberately naive forward pass of a care_mla checkpoint, written straight from docs/FORMAT.md
(per-head loops, explicit softmax, no caching), reading the files directly.

It shares no code with model_defs/ or care_vllm/, so agreement between it, model_defs and vLLM is
evidence that all three implement the format, not the same bug.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.double() for k, v in load_file(str(f)).items()})
    return cfg, tensors


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    ang = (pos.float()[:, None] * inv_freq.float()[None, :]).double()  # [T, half]
    cos, sin = ang.cos(), ang.sin()
    if x.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def _moe(x: torch.Tensor, t: dict, p: str, cfg: dict) -> torch.Tensor:
    """Qwen3-MoE sparse MLP, token by token: softmax router, top-k experts (renormalized when
    norm_topk_prob), each expert a SwiGLU with gate/up stacked in gate_up_proj [E, 2I, D]."""
    probs = torch.softmax(x @ t[p + "gate.weight"].T, -1)
    gate_up, down = t[p + "experts.gate_up_proj"], t[p + "experts.down_proj"]
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        w, experts = probs[i].topk(cfg["num_experts_per_tok"])
        if cfg["norm_topk_prob"]:
            w = w / w.sum()
        for wi, e in zip(w, experts.tolist()):
            gu = gate_up[e] @ x[i]
            out[i] += wi * (down[e] @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
    return out


def _bias(t: dict, linear: str):
    """`linear`'s bias (attention_bias checkpoints), else 0."""
    return t.get(linear + ".bias", 0.0)


@torch.no_grad()
def logits(folder: Path, input_ids: list[int]) -> torch.Tensor:
    """Logits [T, V] (fp64) of one sequence."""
    cfg, t = load_checkpoint(folder)
    n_h, d_h, d_r = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    g, eps = cfg["original_num_key_value_heads"], cfg["rms_norm_eps"]
    inv_freq = torch.tensor(cfg["rope_inv_freq"], dtype=torch.float32)
    ids = torch.tensor(input_ids)
    T = len(input_ids)
    pos = torch.arange(T)
    h = t["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        r_k, r_v = cfg["k_ranks"][l], cfg["v_ranks"][l]
        x = _rms(h, t[p + "input_layernorm.weight"], eps)
        if cfg["use_qk_norm"]:
            q = (x @ t[p + "self_attn.q_proj.weight"].T).view(T, n_h, d_h)
            q_nope = _rms(q, t[p + "self_attn.q_norm.weight"], eps)
            wqr = t[p + "self_attn.q_rope_proj.weight"].view(n_h, d_r, d_h)
            q_pe = torch.stack([q_nope[:, hh] @ wqr[hh].T for hh in range(n_h)], 1)
            k = _rms((x @ t[p + "self_attn.k_proj.weight"].T).view(T, g, d_h),
                     t[p + "self_attn.k_norm.weight"], eps).reshape(T, g * d_h)
            kl = k @ t[p + "self_attn.k_latent_proj.weight"].T
            c_v = x @ t[p + "self_attn.v_latent_proj.weight"].T
            if cfg.get("joint_latent"):   # one latent: the keys' part and the values' part add up
                c, k_pe = kl[:, :r_v] + c_v, kl[:, r_v:]
            else:
                c, k_pe = torch.cat([kl[:, :r_k], c_v], -1), kl[:, r_k:]
        else:
            q = (x @ t[p + "self_attn.q_proj.weight"].T + _bias(t, p + "self_attn.q_proj")).view(T, n_h, d_h + d_r)
            q_nope, q_pe = q[..., :d_h], q[..., d_h:]
            a = x @ t[p + "self_attn.kv_a_proj_with_mqa.weight"].T + _bias(t, p + "self_attn.kv_a_proj_with_mqa")
            c, k_pe = a[:, :r_k + r_v], a[:, r_k + r_v:]
        q_pe, k_pe = _rope(q_pe, pos, inv_freq), _rope(k_pe, pos, inv_freq)
        kv = (c @ t[p + "self_attn.kv_b_proj.weight"].T).view(T, n_h, 2 * d_h)
        outs = []
        for hh in range(n_h):
            s = cfg["softmax_scale"] * (q_nope[:, hh] @ kv[:, hh, :d_h].T + q_pe[:, hh] @ k_pe.T)
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            outs.append(torch.softmax(s, -1) @ kv[:, hh, d_h:])
        h = h + torch.cat(outs, -1) @ t[p + "self_attn.o_proj.weight"].T + _bias(t, p + "self_attn.o_proj")
        x = _rms(h, t[p + "post_attention_layernorm.weight"], eps)
        if p + "mlp.gate.weight" in t:
            h = h + _moe(x, t, p + "mlp.", cfg)
        else:
            gate = x @ t[p + "mlp.gate_proj.weight"].T
            h = h + (torch.nn.functional.silu(gate) * (x @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    h = _rms(h, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return h @ head.T
