"""Output refit: each layer's o_proj refitted by least squares to what its converted attention outputs.

Why: CARE fits the K and V latents to the original keys and values, but the model reads the attention
only through o_proj, and a rank-limited latent's loss there is partly predictable from what it kept (the
heads' outputs are strongly correlated). Given calibration windows, let o be the original attention's
output (o_proj's input) and o' the converted attention's on the converted model's own hidden states
(propagated through the layers already converted and refitted, so each layer also absorbs what the
layers before it got wrong). Then, per layer,

    W_O' = argmin_W  sum ||W o' - W_O o||^2 + lam ||W - W_O||^2  =  W_O (C_oo' + lam I) (C_o'o' + lam I)^-1

with C_oo' = sum o o'^T, C_o'o' = sum o' o'^T and lam = ridge * mean diag(C_o'o') (--o-proj-refit-ridge,
default 0.01 like converter/factorize.py's damping; within 0.6 % of the best perplexity of 0.001 / 0.01 /
0.1 / 1 in every cell of benchmarks/results/refit_ridge.md). The ridge pulls toward the original
o_proj, so where the conversion is exact (o' = o) W_O' = W_O exactly, and directions the calibration
never excites keep the original weights.
o_proj keeps its shape: the cache, the checkpoint format and serving are unchanged.

Measured (docs/RESULTS.md, "o_proj refit"; benchmarks/o_refit.py): SmolLM2 at KV 0.5 one-shot perplexity 34.95 ->
25.1 (uniform ranks), 39.74 -> 29.0 (adjusted), and lower in all 12 cases of that table; propagating through the converted layers was a little
better than fitting every layer on the original hidden states (25.1 vs 25.5), and refitting q/k/v the
same way (a cross-covariance CARE) was worse than not (42.1). Cost: one more pass of the calibration
windows through every layer (the original layer, the converted attention once: its pre-o_proj outputs
o' are kept, so advancing the converted stream only applies the refitted o_proj and the MLP), and three
buffers of the windows' size (two hidden-state streams and o') instead of calibration's one.
"""
from __future__ import annotations

import contextlib

import torch

from . import calibrate
from .options import RIDGE



class OutputRefit:
    """The calibration windows' hidden states in the original model and in the converted one, advanced a
    layer at a time by `layer()` (call it for layers 0, 1, ... in order)."""

    def __init__(self, model, windows: torch.Tensor, care_config, device: str, batch_size: int,
                 dtype: torch.dtype, ridge: float = RIDGE) -> None:
        from model_defs.modeling_care import CareRope   # noqa: PLC0415 (transformers modeling: heavy)

        self.device, self.dtype, self.config, self.ridge = device, dtype, care_config, ridge
        inner = model.model
        n, t = windows.shape
        width = 2 * inner.config.hidden_size + care_config.num_attention_heads * care_config.original_head_dim
        self.park = calibrate.hidden_home(device, n * t * width * torch.finfo(dtype).bits // 8)
        self.original = calibrate.embedded_batches(inner.embed_tokens, windows, batch_size, device, dtype, self.park)
        self.converted = [h.clone() for h in self.original]
        self.pos = torch.arange(t, device=device).unsqueeze(0)
        self.source_rope = inner.rotary_emb
        self.care_rope = CareRope(care_config).to(device)
        self.mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]

    @torch.no_grad()
    def layer(self, l: int, src_layer: torch.nn.Module, attn_tensors: dict[str, torch.Tensor],
              layer_in_memory=None) -> tuple[torch.Tensor, dict]:
        """Refit layer l's o_proj and advance both streams past layer l. `attn_tensors`: the converted
        layer's attention tensors as they will be written (assemble.attention_tensors, names under
        self_attn, o_proj excluded). Returns (o_proj weight [D, n_h*d_h] fp64 on the CPU, report)."""
        from model_defs.modeling_care import CareMLAAttention   # noqa: PLC0415

        with layer_in_memory(l, self.dtype, self.device) if layer_in_memory else contextlib.nullcontext():
            layer = calibrate.working_copy(src_layer, self.device, self.dtype)
            try:
                w_o = src_layer.self_attn.o_proj.weight.detach().to(self.device, torch.float64)
                attn = CareMLAAttention(self.config, l)
                attn.load_state_dict({**attn_tensors, "o_proj.weight": w_o}, strict=True)
                attn.to(self.device, self.dtype).eval()
                c_pp, c_po, total, fitted = self._moments(layer, attn, self._value_bias(src_layer))
                new_w_o, report = _solve(w_o, c_pp, c_po, total, self.ridge)
                attn.o_proj.weight.copy_(new_w_o)
                self._advance_converted(layer, attn, fitted)
            finally:
                if layer is src_layer:
                    layer.cpu()
        return new_w_o.cpu(), report

    def _fit_input(self, attn, h: torch.Tensor, input_norm) -> torch.Tensor:
        """The converted attention's output before o_proj, o' [B, T, n_h*d_h], for hidden states h
        [B, T, D] normed by the source layer's `input_norm` (o_proj swapped out for the call: the
        weight it would apply is the one being refitted)."""
        o_proj, attn.o_proj = attn.o_proj, torch.nn.Identity()
        try:
            out, _ = attn(input_norm(h), self.care_rope(self.pos.expand(h.shape[0], -1)), attention_mask=self.mask)
        finally:
            attn.o_proj = o_proj
        return out

    def _value_bias(self, src_layer) -> torch.Tensor | None:
        """The source's value bias as each query head outputs it [n_h*d_h] (None: no bias). A converted layer
        with biases carries it in o_proj's bias (converter/assemble.py: output_bias), outside the fit."""
        from .assemble import expanded_value_bias   # noqa: PLC0415

        bv = src_layer.self_attn.v_proj.bias
        if bv is None:
            return None
        return expanded_value_bias(bv.detach().to(self.device, torch.float64), self.config.num_attention_heads,
                                   self.config.original_num_key_value_heads)

    def _moments(self, layer, attn, value_bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, float, list[torch.Tensor]]:
        """(C_o'o', C_o'o, sum ||W_O o||^2) over all windows, fp64, and o' per batch (on self.park, for
        _advance_converted); advances the original stream past the layer. (The sum from o_proj's own
        output: C_oo would cost as much as each of the others.) `value_bias`: taken off the original's o,
        whose constant part the converted o_proj's bias already outputs (the target is W_O (o - b_V)), and
        likewise (with o_proj's own bias) off the sum."""
        seen = {}
        hook = layer.self_attn.o_proj.register_forward_hook(lambda _m, args, out: seen.update(o=args[0], y=out))
        c_pp = c_po = None
        total = 0.0
        fitted = []
        try:
            for i, (h, h_conv) in enumerate(zip(self.original, self.converted)):
                h, h_conv = h.to(self.device), h_conv.to(self.device)
                o_conv = self._fit_input(attn, h_conv, layer.input_layernorm)
                fitted.append(o_conv.to(self.park))
                out = calibrate.layer_forward(layer, h, self.pos, self.source_rope, self.device)
                self.original[i] = out.to(self.park)
                o, p = seen.pop("o").flatten(0, 1).double(), o_conv.flatten(0, 1).double()
                y = seen.pop("y").flatten(0, 1).double()
                if value_bias is not None:
                    o = o - value_bias
                if layer.self_attn.o_proj.bias is not None or value_bias is not None:
                    y = o @ layer.self_attn.o_proj.weight.double().T   # W_O (o - b_V), without b_O
                total += y.square().sum().item()
                if c_pp is None:
                    c_pp, c_po = p.T @ p, p.T @ o
                else:
                    c_pp.addmm_(p.T, p), c_po.addmm_(p.T, o)
        finally:
            hook.remove()
        return c_pp, c_po, total, fitted

    def _advance_converted(self, layer, attn, fitted: list[torch.Tensor]) -> None:
        """The converted stream through the converted layer: the refitted o_proj on `fitted`, the o' of
        _moments (what the converted attention would recompute from the same inputs), then the source's
        MLP (the conversion copies the norms and MLP unchanged)."""
        for i, (h, o_conv) in enumerate(zip(self.converted, fitted)):
            h = h.to(self.device) + attn.o_proj(o_conv.to(self.device))
            with calibrate.matmul_precision(self.device):
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            self.converted[i] = h.to(self.park)


def _solve(w_o: torch.Tensor, c_pp: torch.Tensor, c_po: torch.Tensor, total: float,
           ridge: float) -> tuple[torch.Tensor, dict]:
    """W_O' = W_O (C_oo' + lam I)(C_o'o' + lam I)^-1 (module docstring), and the relative error of the
    layer's attention output (sum ||W o' - W_O o||^2 / sum ||W_O o||^2, square-rooted) before and after.

    Two [n, n] x [n, D] products and a Cholesky solve (A = C_o'o' + lam I is positive definite): the
    cross term of both errors reuses G = C_po W_O^T, which the right-hand side needs anyway, and the
    refitted weight's quadratic term comes from the solve itself (C_o'o' W'^T = rhs - lam W'^T), so only
    W_O's needs a product of its own. (The direct form took five such products and an LU: 13.9 s instead
    of 7.7 s at n = D = 4096, Llama-3.1-8B shapes, on 2 CPU cores in fp64; identical to 4e-13.)"""
    lam = ridge * c_pp.diagonal().mean().clamp_min(1e-30)
    a = 0.5 * (c_pp + c_pp.T)                            # C_o'o', symmetrised; + lam I below
    g = c_po @ w_o.T                                     # [n, D]: C_o'o W_O^T
    rhs = g + lam * w_o.T
    quad_before = ((a @ w_o.T) * w_o.T).sum().item()    # tr(W_O C_o'o' W_O^T)
    a.diagonal().add_(lam)                               # A = C_o'o' + lam I
    chol, info = torch.linalg.cholesky_ex(a)
    # only non-finite moments make the factorization fail; the general solve then passes them on as before
    new_t = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(a, rhs)

    def error(quad: float, cross: float) -> float:   # sqrt((tr(W C W^T) - 2 tr(W C_po W_O^T) + total) / total)
        return (max(quad - 2 * cross + total, 0.0) / max(total, 1e-30)) ** 0.5

    before = error(quad_before, (g * w_o.T).sum().item())
    after = error((new_t * (rhs - lam * new_t)).sum().item(), (g * new_t).sum().item())
    return new_t.T.contiguous(), {"attn_rel_error_before_refit": round(before, 6), "attn_rel_error": round(after, 6)}
