"""Dropout's keep-bits, drawn the same way by every kernel that drops: attention's forward and
backward passes (attention_kernels.py), add+LN's forward and backward
(add_layer_norm_kernels.py), and the mask helpers the tests rebuild the masks with.

One Philox4x32-10 call (Triton's tl.philox) yields four 32-bit words, and they serve four
consecutive columns: element (row, col) is kept when word col % 4 of the call at counter
base(row) + col // 4, under the kernel's 64-bit key, maps (as tl.rand maps a word) to a
uniform value >= dropout_p. The counter is 64 bits wide, split into Philox's first two 32-bit
counter words (low, high), so attention's flattened (batch * head, query, key) index fits at
any size while every multiply stays 32-bit.

Why: the kernels first called tl.rand per element, which makes the same Philox call and keeps
one word of four; and attention's counter was an int64, for which Triton runs Philox on 64-bit
words (its multiply-highs 64-bit). The training step's dropout (0.1 on attention and on both
residual branches in BERT) pays it in every layer, forward and backward. Compiled for sm_90
(the stand-in driver of bench/offline.py; bf16, head dim 64, 64 x 64 tiles; PTX
instructions with dropout, then without), before -> with this:
    attention forward   6850 -> 3860   (1554 without)
    dK/dV pass          3955 -> 2457   (1200)
    dQ pass             3664 -> 2151   (978)
    add+LN forward       850 -> 477    (203);  backward 928 -> 555 (312)
and ptxas's spills (tests/triton_compile_check.py --only dropout, sm_90, the default
configs): forward at head dim 64 100 -> 0 bytes (255 -> 234 registers), dQ 248 -> 0, dK/dV
492 -> 216; at head dim 128 forward 128 -> 40, dQ 408 -> 200, dK/dV 1152 -> 832. The cost:
the four words of a call land in a layout that is not the score tile's, so each tile's keep
bits cross shared memory once (+8 KB of shared memory in the forward). Not timed on a GPU.

The bits depend only on (key, base(row), col): any tile shape gives the same mask, so the
forward, both backward passes and the helpers agree whatever blocks they use. A tile of
BLOCK >= 4 columns starts at a multiple of 4 (every caller's tiles start at multiples of
their width) and reshapes the four words of each call into its four columns; a narrower one
(add+LN rows of N < 4) takes each column's word by its lane, the same bits.
"""
import triton
import triton.language as tl


@triton.jit
def _words(key, counter):
    """The four Philox4x32-10 words at the 64-bit `counter` (int64) under `key` (int64)."""
    c0 = counter.to(tl.uint32)  # the low 32 bits
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(key, c0, c1, zero, zero)


@triton.jit
def keep_bits(key, base, col0, dropout_p, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """[ROWS, BLOCK] bool, True where kept: element (i, j) is column col0 + j of the row whose
    counters start at base[i]. key: int64, a scalar or [ROWS, 1]; base: int64, a scalar or
    [ROWS, 1]; col0 a multiple of 4 when BLOCK >= 4."""
    if BLOCK >= 4:
        quads = (col0 // 4 + tl.arange(0, BLOCK // 4)).to(tl.int64)
        w0, w1, w2, w3 = _words(key, base + quads[None, :])
        # join(join(w0, w2), join(w1, w3)) is [ROWS, BLOCK // 4, 2, 2] holding w0, w1, w2, w3
        # of each call in row-major order: column 4q + lane gets word `lane` of call q.
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, BLOCK])
    else:
        cols = (col0 + tl.arange(0, BLOCK)).to(tl.int64)[None, :]
        w0, w1, w2, w3 = _words(key, base + cols // 4)
        lane = cols % 4
        words = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        words = tl.broadcast_to(words, [ROWS, BLOCK])
    return tl.random.uint_to_uniform_float(words) >= dropout_p
