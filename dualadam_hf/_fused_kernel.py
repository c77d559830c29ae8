"""The Triton kernel of the Triton path; imported only when that path runs (see ``fused.triton_update``)."""

import triton
import triton.language as tl


@triton.jit
def cast(x, DTYPE: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    # Compiled kernels round fp32 -> bf16 to nearest even; the interpreter
    # truncates (triton/runtime/interpreter.py, cast_impl), which biases every
    # stored bf16 parameter toward zero. Round by hand only there.
    if EMULATE_RTNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def stochastic_round_bf16(x, seed, noise_offs):
    # dualadam_hf.functional.stochastic_round_to_bf16 in Triton: 16 uniform random bits added to the fp32
    # pattern carry into the next bf16 with probability (low bits) / 2**16, so the expected result is x.
    # Bit operations only: the same result compiled and interpreted.
    noise = tl.randint(seed, noise_offs) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True) + noise
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def update_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs, numel, decay, adam, inv, eps_c, b1, b2, seed_ptr,
                 P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
                 EMULATE_RTNE: tl.constexpr, MASKED: tl.constexpr, STOCHASTIC: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The folded update (dualadam_hf.schedule.fold) on one block, in fp32. STOCHASTIC: a bf16 parameter is
    stored with stochastic rounding, its noise drawn at the element's place in the launch under this step's
    seed (read from seed_ptr), so no two elements of a launch share a draw."""
    if MASKED:
        mask = offs < numel
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptrs).to(tl.float32)
        m = tl.load(m_ptrs).to(tl.float32)
        v = tl.load(v_ptrs).to(tl.float32)
        p = tl.load(p_ptrs).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = m + (1.0 - b1) * (g - m)
    v = b2 * v + (1.0 - b2) * g * g
    den = tl.sqrt_rn(v) + eps_c
    p = p * decay - adam * tl.div_rn(m, den) - inv * (m * den)
    if STOCHASTIC and P_DTYPE == tl.bfloat16:
        noise_offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        p_out = stochastic_round_bf16(p, tl.load(seed_ptr), noise_offs)
    else:
        p_out = cast(p, P_DTYPE, EMULATE_RTNE)
    if MASKED:
        tl.store(p_ptrs, p_out, mask=mask)
        tl.store(m_ptrs, cast(m, S_DTYPE, EMULATE_RTNE), mask=mask)
        tl.store(v_ptrs, cast(v, S_DTYPE, EMULATE_RTNE), mask=mask)
    else:
        tl.store(p_ptrs, p_out)
        tl.store(m_ptrs, cast(m, S_DTYPE, EMULATE_RTNE))
        tl.store(v_ptrs, cast(v, S_DTYPE, EMULATE_RTNE))


# n_tensors varies with the model; specializing on it would compile per model size.
@triton.jit(do_not_specialize=["n_tensors"])
def dualadam_kernel(
    # "fp64": Triton passes Python floats as fp32 unless annotated (ruff reads the
    # strings as names, hence noqa).
    chunk_tensor, table, coefs, decay_ptr, n_tensors, beta1: "fp64", beta2: "fp64",  # noqa: F821
    seed_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr, ALIGNED: tl.constexpr,
    WIDE: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    # table rows (int64, n_tensors each): p, g, m, v pointers, numel, first program, coefficient row.
    # coefs: float32 rows (adam, inverse, eps_c), one per tensor of the update (functional.coefficients);
    # decay_ptr: the float32 weight-decay factor shared by all. seed_ptr: with STOCHASTIC, the int64 seed of
    # this launch's noise, on the device (the launcher advances it every step); read by nothing otherwise.
    pid = tl.program_id(0)
    i = tl.load(chunk_tensor + pid)
    p_ptr = tl.load(table + i).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table + n_tensors + i).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(table + 2 * n_tensors + i).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(table + 3 * n_tensors + i).to(tl.pointer_type(S_DTYPE))
    numel = tl.load(table + 4 * n_tensors + i)
    first = tl.load(table + 5 * n_tensors + i)
    row = tl.load(table + 6 * n_tensors + i)
    adam = tl.load(coefs + 3 * row)
    inv = tl.load(coefs + 3 * row + 1)
    eps_c = tl.load(coefs + 3 * row + 2)
    decay = tl.load(decay_ptr)
    b1 = tl.cast(beta1, tl.float32)
    b2 = tl.cast(beta2, tl.float32)

    # 32-bit offsets unless a tensor has 2**31 elements or more: 64-bit address arithmetic costs registers.
    if WIDE:
        start = (pid - first).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
    else:
        start = (pid - first).to(tl.int32) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        numel = numel.to(tl.int32)
    if ALIGNED:
        # Pointers read from a table carry no alignment facts; without these
        # hints every access is a scalar load. The launcher checks alignment.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    # A mask of unknown divisibility also forces scalar accesses: only the
    # last block of a tensor is masked.
    if start + BLOCK <= numel:
        update_block(p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, offs, numel,
                     decay, adam, inv, eps_c, b1, b2, seed_ptr, P_DTYPE, S_DTYPE, MAXIMIZE, EMULATE_RTNE, False,
                     STOCHASTIC, BLOCK)
    else:
        update_block(p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, offs, numel,
                     decay, adam, inv, eps_c, b1, b2, seed_ptr, P_DTYPE, S_DTYPE, MAXIMIZE, EMULATE_RTNE, True,
                     STOCHASTIC, BLOCK)
