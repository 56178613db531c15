"""IBM Granite 3.x sources (`GraniteForCausalLM`, e.g. granite-3.1-8b-instruct: 32 query / 8 KV heads of 128).

A Granite layer is a Llama layer plus four constants, which fold exactly into the weights, so the loaded model
is re-expressed as a plain `LlamaForCausalLM` (converter/llama_view.py) and converts and serves as Llama:

  Granite:  h_0 = m_e embed(x);  h += r attn(norm(h));  h += r mlp(norm(h));  logits = lm_head(norm(h)) / s,
            attention logits = a q.k  (a = attention_multiplier instead of head_dim^-0.5)

* a: the queries are scaled by a sqrt(head_dim) (q_proj rows and bias), so Llama's head_dim^-0.5 gives a q.k.
* m_e and r: run the residual stream divided by m_e, h' = h / m_e. Then h'_0 = embed(x) and every layer adds
  (r / m_e) times its output: o_proj and down_proj (and o_proj's bias) are scaled by r / m_e. Every RMSNorm sees
  h' instead of h, and RMSNorm(m_e h') with eps equals RMSNorm(h') with eps / m_e^2 (x / sqrt(ms(x) + eps) is
  that invariant), so rms_norm_eps becomes eps / m_e^2.
* s: the final norm's weight is divided by s, which divides the logits (and keeps a tied lm_head the
  embedding).

The scaled tensors are new tensors in the source's dtype (a bf16 source's product rounded once to bf16, as
writing it would round it anyway); the rest are the source's own.
"""
from __future__ import annotations

import math

import torch

from . import architectures, llama_view

ARCHITECTURE = architectures.GRANITE


def as_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as a `LlamaForCausalLM` with Granite's multipliers folded into its weights."""
    src = model.config
    m_e, r, s = float(src.embedding_multiplier), float(src.residual_multiplier), float(src.logits_scaling)
    cfg = llama_view.llama_config(src, rms_norm_eps=src.rms_norm_eps / m_e ** 2)
    q_scale = float(src.attention_multiplier) * math.sqrt(cfg.head_dim)
    out_scale = r / m_e

    def scaled(t: torch.Tensor, k: float) -> torch.Tensor:
        return t if k == 1.0 else (t.to(torch.float64) * k).to(t.dtype)

    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            t = scaled(t, q_scale)
        elif name.endswith(("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")):
            t = scaled(t, out_scale)
        elif name == "model.norm.weight":
            t = scaled(t, 1.0 / s)
        state[name] = t
    return llama_view.build(model, cfg, state)
