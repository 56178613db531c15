"""vLLM's Triton MLA decode at every care width: the tile choice of its launcher, fixed for the widths it got wrong.

vLLM 0.32's `_decode_grouped_att_m_fwd` (vllm/v1/attention/ops/triton_decode_attention.py) tiles a latent row of
width Lk = r + d_r as next_pow2(r) + next_pow2(d_r), masked to Lk, except that on NVIDIA it fixes width 576 to
512 + 64 and width 288 to 256 + 32, DeepSeek's splits. For those widths with another split (r 544 + rope 32, or
r 272 + rope 16: one layer of an adjusted-rank conversion may land there, and every layer of a uniform 576 one
whose rope is not 64) the value tile, next_pow2(r), no longer matches the key tile and the kernel fails
("incompatible dimensions", at compile time on sm_90). And a rope of 8 or less gives a rope tile of 8, which
`tl.dot` refuses on NVIDIA (K must be >= 16; Triton's CPU interpreter accepts it).

`install()` wraps the launcher so that those cases launch vLLM's own stage-1 kernel with the general tiling
(`block_sizes`): next_pow2(r) + max(16, next_pow2(d_r)), the extra rope lanes masked off like the others. Every other
case, and ROCm, goes to vLLM's launcher unchanged (for r 512 + 64 and 256 + 32 the general tiling is the
special one). Checked in Triton's interpreter against the PyTorch paged decode and compiled for sm_90 on CPU
(tests/test_triton_decode_interpreted.py); not yet run on a GPU.
"""
from __future__ import annotations

MIN_DOT_K = 16   # tl.dot's smallest inner dimension on NVIDIA


def block_sizes(lk: int, lv: int) -> tuple[int, int]:
    """(BLOCK_DMODEL, BLOCK_DPE) of a latent row of width `lk` whose first `lv` values are the latent: the
    general tiling of vLLM's launcher, with a rope tile of at least MIN_DOT_K."""
    from vllm.triton_utils import triton

    rope = lk - lv
    return triton.next_power_of_2(lv), (max(MIN_DOT_K, triton.next_power_of_2(rope)) if rope > 0 else 0)


def stock_tiles_fail(lk: int, lv: int) -> bool:
    """Whether vLLM's launcher picks tiles for an MLA row (`lk` wide, latent `lv`) that do not compile on NVIDIA."""
    return (lk == 576 and lv != 512) or (lk == 288 and lv != 256) or 0 < lk - lv < MIN_DOT_K


def install() -> None:
    """Idempotent: route the MLA decode launches vLLM's launcher tiles wrongly to `launch_stage1`."""
    from vllm.v1.attention.ops import triton_decode_attention as tda

    stock = tda._decode_grouped_att_m_fwd
    if getattr(stock, "care_wrapped", False):
        return

    def _decode_grouped_att_m_fwd(q, k_buffer, v_buffer, att_out, Req_to_tokens, B_Seqlen, num_kv_splits,
                                  sm_scale, page_size, logit_cap, k_scale, v_scale, is_mla=False):
        args = (q, k_buffer, v_buffer, att_out, Req_to_tokens, B_Seqlen, num_kv_splits, sm_scale, page_size,
                logit_cap, k_scale, v_scale)
        if is_mla and not tda.is_hip_ and stock_tiles_fail(k_buffer.shape[-1], v_buffer.shape[-1]):
            return launch_stage1(*args)
        return stock(*args, is_mla=is_mla)

    _decode_grouped_att_m_fwd.care_wrapped = True
    tda._decode_grouped_att_m_fwd = _decode_grouped_att_m_fwd


def launch_stage1(q, k_buffer, v_buffer, att_out, Req_to_tokens, B_Seqlen, num_kv_splits, sm_scale, page_size,
                  logit_cap, k_scale, v_scale) -> None:
    """vLLM 0.32's `_decode_grouped_att_m_fwd` for an MLA row on NVIDIA, with `block_sizes`' tiles: the same kernel,
    grid, strides, warps and stages."""
    from vllm.triton_utils import triton
    from vllm.v1.attention.ops import triton_decode_attention as tda

    lk, lv = k_buffer.shape[-1], v_buffer.shape[-1]
    block_dmodel, block_dpe = block_sizes(lk, lv)
    batch, head_num = q.shape[0], q.shape[1]
    kv_group_num = q.shape[1] // k_buffer.shape[-2]
    block_h = 16
    grid = (batch, triton.cdiv(head_num, min(block_h, kv_group_num)), num_kv_splits)
    tda._fwd_grouped_kernel_stage1[grid](
        q, k_buffer, v_buffer, sm_scale, Req_to_tokens, B_Seqlen, att_out,
        Req_to_tokens.stride(0), q.stride(0), q.stride(1),
        tda._page_stride(k_buffer, page_size), k_buffer.stride(-3), k_buffer.stride(-2),
        tda._page_stride(v_buffer, page_size), v_buffer.stride(-3), v_buffer.stride(-2),
        att_out.stride(0), att_out.stride(1), att_out.stride(2),
        k_scale, v_scale,
        kv_group_num=kv_group_num, q_head_num=head_num, BLOCK_DMODEL=block_dmodel, BLOCK_DPE=block_dpe,
        BLOCK_DV=triton.next_power_of_2(lv), BLOCK_N=32, BLOCK_H=block_h, NUM_KV_SPLITS=num_kv_splits,
        PAGE_SIZE=page_size, logit_cap=logit_cap, num_warps=4, num_stages=1 if block_dmodel >= 1024 else 2,
        Lk=lk, Lv=lv, IS_MLA=True)
