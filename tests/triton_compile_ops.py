"""The add+LayerNorm, reduction and Linear+GELU jobs of tests/triton_compile_check.py (kept
apart so that file stays readable). `add_jobs(jobs, check)` appends them; `check` is the
triton_compile_check module itself (its Ptr, _add, shapes and flags).
"""
import importlib


def add_jobs(jobs, check):
    Ptr, _add, ARCHS, FULL = check.Ptr, check._add, check.ARCHS, check.FULL
    B, L, triton_next_pow2 = check.B, check.L, check.triton_next_pow2
    aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
    alnk = importlib.import_module("fuseformer.kernels.add_layer_norm_kernels")
    red = importlib.import_module("fuseformer.kernels.reduce")
    lg = importlib.import_module("fuseformer.kernels.linear_gelu_kernels")

    # --- add + LayerNorm. Row lengths: BERT-base 768 (BLOCK 1024), the widest single-block
    # row (BLOCK 16384) and a chunked one (N > MAX_FUSED_BLOCK).
    chunked_n = aln.MAX_FUSED_BLOCK + aln.MAX_FUSED_BLOCK // 2

    def ln_values(dt, drop, **extra):
        return dict(X=Ptr(dt), RES=Ptr(dt), W=Ptr(dt), B=Ptr(dt), Y=Ptr(dt), STREAM=Ptr(dt), MEAN=Ptr("fp32"),
                    RSTD=Ptr("fp32"), SEED=Ptr("i64") if drop else Ptr("fp32"), eps=1e-5,
                    dropout_p=0.1 if drop else 0.0, **extra)

    def ln_flags(res, w, b, drop, save):
        return "".join(c for c, on in (("r", res), ("w", w), ("b", b), ("d", drop), ("s", save)) if on) or "-"

    def ln_fwd(arch, dt, N, res=True, w=True, b=True, drop=False, save=True, stats=True):
        block, single = aln._block(N)
        cx = dict(HAS_RES=res, HAS_W=w, HAS_B=b, DROPOUT=drop, SAVE_STREAM=save, SAVE_STATS=stats, BLOCK=block,
                  SINGLE=single)
        _add(jobs, "add_ln_fwd", alnk._add_ln_fwd, arch, f"{dt} N={N} {ln_flags(res, w, b, drop, save)}",
             ln_values(dt, drop, N=N), cx, options=dict(num_warps=aln._num_warps(block)))

    def ln_fwd_rows(arch, dt, N, res=True, w=True, b=True, drop=False, save=True, stats=True, stages=1):
        rows, block, align, _, _ = aln.rows_plan(B * L, N, "rows", None)
        cx = dict(HAS_RES=res, HAS_W=w, HAS_B=b, DROPOUT=drop, SAVE_STREAM=save, SAVE_STATS=stats, ROWS=rows,
                  BLOCK=block, ALIGN=align, STAGES=stages)
        name = "add_ln_fwd_rows" if stages == 1 else "add_ln_fwd_rows_pipelined"
        _add(jobs, name, alnk._add_ln_fwd_rows, arch, f"{dt} N={N} {ln_flags(res, w, b, drop, save)}",
             ln_values(dt, drop, M=B * L, N=N), cx, options=dict(num_warps=aln._num_warps(rows * block)))

    def ln_bwd(arch, dt, N, dstream=False, res=True, w=True, b=True, drop=False, variant="loop", dx_sum=False):
        block, single, stages, _ = aln.backward_plan(B * L, N, variant, None)
        v = dict(DY=Ptr(dt), DSTREAM=Ptr(dt), STREAM=Ptr(dt), W=Ptr(dt), MEAN=Ptr("fp32"), RSTD=Ptr("fp32"),
                 SEED=Ptr("i64") if drop else Ptr("fp32"), DX=Ptr(dt), DRES=Ptr(dt), PART=Ptr("fp32"),
                 M=B * L, N=N, dropout_p=0.1 if drop else 0.0)
        cx = dict(HAS_DSTREAM=dstream, HAS_RES=res, HAS_W=w, HAS_B=b, DX_SUM=dx_sum, DROPOUT=drop, BLOCK=block,
                  SINGLE=single, STAGES=stages)
        flags = "".join(c for c, on in (("t", dstream), ("r", res), ("w", w), ("b", b), ("d", drop), ("s", dx_sum))
                        if on) or "-"
        name = "add_ln_bwd" if variant == "loop" else "add_ln_bwd_pipelined"
        _add(jobs, name, alnk._add_ln_bwd, arch, f"{dt} N={N} {flags}", v, cx,
             options=dict(num_warps=aln._num_warps(block)))

    # The warp count is a rule of the block (no autotuner): 4096, BERT's 768, and below.
    for arch in ARCHS:
        ln_fwd(arch, "fp16", 4096)
        ln_fwd(arch, "bf16", 768, res=False, w=False, b=False, save=False, stats=False)
        ln_bwd(arch, "fp16", 768, dstream=True, drop=True)
        # BERT's training backward: no dropout, so d residual is d x, written once (HAS_RES off).
        ln_bwd(arch, "bf16", 768, res=False)
        # A fused block's (models/fused_block.py): dropout, and the linear's bias gradient summed.
        ln_bwd(arch, "bf16", 768, drop=True, dx_sum=True)
        _add(jobs, "ln_keep_mask", alnk._keep_mask_kernel, arch, "N=768",
             dict(SEED=Ptr("i64"), OUT=Ptr("i8"), N=768, dropout_p=0.1), dict(BLOCK=1024))
        # The multi-row kernel: BERT's 768 in bf16 (the 16-byte vector case the compile test
        # inspects), with dropout and the stream, and a row length of odd alignment (1000).
        ln_fwd_rows(arch, "bf16", 768, save=False, stats=False)
        # The pipelined variants (next tile / row prefetched): BERT's inference forward and
        # training backward, and the backward with every flag on.
        ln_fwd_rows(arch, "bf16", 768, save=False, stats=False, stages=aln.PIPELINE_STAGES)
        ln_fwd_rows(arch, "bf16", 768, stages=aln.PIPELINE_STAGES)  # training without dropout: stream, stats
        ln_bwd(arch, "bf16", 768, res=False, variant="pipelined")
        ln_bwd(arch, "fp16", 768, dstream=True, drop=True, variant="pipelined")
        for stages in (1, aln.PIPELINE_STAGES):
            _add(jobs, "sum_rows" if stages == 1 else "sum_rows_pipelined", red._sum_rows, arch, "fp32->bf16,fp32",
                 dict(PART=Ptr("fp32"), OUT=Ptr("bf16"), OUT2=Ptr("fp32"), OUT3=Ptr("bf16"), P=528, N=768),
                 dict(BLOCK_P=red._BLOCK_P, BLOCK_N=red._BLOCK_N, G=2, STAGES=stages),
                 options=dict(num_warps=4))
        _add(jobs, "sum_rows", red._sum_rows, arch, "fp32->bf16,bf16,bf16",
             dict(PART=Ptr("fp32"), OUT=Ptr("bf16"), OUT2=Ptr("bf16"), OUT3=Ptr("bf16"), P=528, N=768),
             dict(BLOCK_P=red._BLOCK_P, BLOCK_N=red._BLOCK_N, G=3, STAGES=1), options=dict(num_warps=4))
        if arch == 90 or FULL:
            ln_fwd_rows(arch, "bf16", 768, drop=True)
            ln_fwd_rows(arch, "bf16", 768, drop=True, stages=aln.PIPELINE_STAGES)
            ln_bwd(arch, "fp32", aln.CHUNK, drop=True, variant="pipelined")  # 16 warps, one program per SM
            ln_fwd_rows(arch, "fp16", 1000, res=False)
            ln_fwd(arch, "fp16", chunked_n, drop=True)
            ln_bwd(arch, "bf16", chunked_n, dstream=True, drop=True)
            ln_fwd(arch, "fp16", 16384, res=False)
            ln_bwd(arch, "fp16", 16384)  # chunked in the backward (aln.CHUNK)
            ln_bwd(arch, "fp32", aln.CHUNK, drop=True)  # the widest single-block backward
    if FULL:
        ln_fwd(90, "bf16", 768, drop=True, save=False)
        ln_bwd(90, "bf16", 768, res=False, w=False, b=False)
        ln_bwd(90, "fp16", chunked_n, res=False, drop=False)

    # --- cross-entropy: BERT's vocabulary (30522: the forward's row walk, 15 backward chunks)
    # in bf16 with int64 labels, its rows 30528 apart as the models pad them (16-byte aligned
    # rows: vector loads); a small fp32 one with int32 labels.
    ce = importlib.import_module("fuseformer.kernels.cross_entropy")
    cek = importlib.import_module("fuseformer.kernels.cross_entropy_kernels")
    for arch in ARCHS:
        for dt, V, row, lab in (("bf16", 30528, 30528, "i64"), ("fp32", 1000, 1000, "i32")):
            fwd_block, bwd_block = min(ce.FWD_BLOCK, triton_next_pow2(V)), min(ce.BWD_BLOCK, triton_next_pow2(V))
            strides = dict(V=V, stride_xm=row, stride_xv=1, stride_y=1, ignore_index=-100)
            _add(jobs, "ce_fwd", cek._ce_fwd, arch, f"{dt} V={V} {lab}",
                 dict(X=Ptr(dt), Y=Ptr(lab), LOSS=Ptr("fp32"), AUX=Ptr("fp32"), **strides, loss_at=4098),
                 dict(BLOCK=fwd_block),
                 options=dict(num_warps=8 if fwd_block >= 2048 else 4))
            _add(jobs, "ce_bwd", cek._ce_bwd, arch, f"{dt} V={V} {lab}",
                 dict(X=Ptr(dt), Y=Ptr(lab), AUX=Ptr("fp32"), G=Ptr("fp32"), DX=Ptr(dt),
                      stride_g=0, **strides),
                 dict(BLOCK=bwd_block, MEAN=True), options=dict(num_warps=4 if bwd_block >= 1024 else 2))
            _add(jobs, "ce_reduce", cek._ce_reduce, arch, f"{lab}",
                 dict(LOSS=Ptr("fp32"), Y=Ptr(lab), OUT=Ptr("fp32"), AUX=Ptr("fp32"), X=Ptr(dt), M=4096, C=V,
                      stride_y=1, ignore_index=-100, loss_at=4098, V=V, stride_xm=row, stride_xv=1),
                 dict(BLOCK=ce.REDUCE_BLOCK, REDUCE=True, MEAN=True, CHECK=True, ROWS_V=0),
                 options=dict(num_warps=4, debug=True, sanitize_overflow=False))  # as the launcher compiles it
        # A small problem's one launch (ce.SMALL_SCORES): the reducing program making the rows,
        # tiles of SMALL_TILE scores: 2 classes (a sequence-classification head) and 1000.
        for dt, V, lab in (("bf16", 2, "i64"), ("fp32", 1000, "i32")):
            rows_v = triton_next_pow2(V)
            _add(jobs, "ce_reduce", cek._ce_reduce, arch, f"{dt} small V={V} {lab}",
                 dict(LOSS=Ptr("fp32"), Y=Ptr(lab), OUT=Ptr("fp32"), AUX=Ptr("fp32"), X=Ptr(dt), M=8, C=V,
                      stride_y=1, ignore_index=-100, loss_at=10, V=V, stride_xm=V, stride_xv=1),
                 dict(BLOCK=ce.SMALL_TILE // rows_v, REDUCE=True, MEAN=True, CHECK=True, ROWS_V=rows_v),
                 options=dict(num_warps=4, debug=True, sanitize_overflow=False))

    # --- Linear + GELU. BERT-base FFN (K=768, EVEN_K) and a ragged K (masked tail).
    def fast_tag(fast):
        return " fast" if fast else ""

    def lin(arch, dt, K, configs, bias=True, tanh=False, save=True, fast=False):
        M, N = B * L, 4 * 768
        v = dict(X=Ptr(dt), W=Ptr(dt), B=Ptr(dt), OUT=Ptr(dt), PRE=Ptr(dt), M=M, N=N, K=K, stride_xm=K, stride_xk=1,
                 stride_wn=K, stride_wk=1, stride_om=N, TUNE_M=triton_next_pow2(M))
        cx = dict(HAS_BIAS=bias, SAVE_PRE=save, APPROX_TANH=tanh, FAST_GELU=fast, UPCAST=False,
                  PRECISION="ieee" if dt == "fp32" else "tf32")
        case = (f"{dt} K={K} {'tanh' if tanh else 'erf'}{' bias' if bias else ''}{' pre' if save else ''}"
                f"{fast_tag(fast)}")
        _add(jobs, "linear_gelu_fwd", lg._linear_gelu_fwd, arch, case, v, cx, configs=configs)

    for arch in ARCHS:
        if arch == 90 or FULL:
            lin(arch, "fp16", 768, "all")
        lin(arch, "bf16", 1000, "first" if arch == 90 else "most_warps", bias=False, tanh=True, save=False)
        # The fast GELU maths (gelu="fast"): the BERT FFN in training, erf.
        lin(arch, "bf16", 768, "first" if arch == 90 else "most_warps", fast=True)
        for tanh in (False, True):
            for fast in (False, True):
                _add(jobs, "gelu_bwd", lg._gelu_bwd, arch, "bf16 " + ("tanh" if tanh else "erf") + fast_tag(fast),
                     dict(DOUT=Ptr("bf16"), PRE=Ptr("bf16"), DPRE=Ptr("bf16"), numel=B * L * 3072),
                     dict(APPROX_TANH=tanh, FAST_GELU=fast, BLOCK=4096), options=dict(num_warps=8))
        for fast in (False, True):
            _add(jobs, "gelu_bwd_db", lg._gelu_bwd_db, arch, "bf16 erf bias" + fast_tag(fast),
                 dict(DOUT=Ptr("bf16"), PRE=Ptr("bf16"), DPRE=Ptr("bf16"), DB_PART=Ptr("fp32"), M=B * L, N=3072),
                 dict(APPROX_TANH=False, FAST_GELU=fast, HAS_BIAS=True, BLOCK_M=32, BLOCK_N=128),
                 options=dict(num_warps=8))

    # The persistent TMA GEMM runs on sm_90+ only (_tma_ok): every config for the BERT FFN
    # forward in training (bias, pre saved, stored through descriptors), the backward's dgelu
    # recompute epilogue, and a ragged case (K = 1000, N = 1000 * 2 bytes: pointer stores).
    def lin_tma(dt, K, N, configs, bias=True, tanh=False, save=True, dgelu=False, fast=False):
        M = B * L
        v = dict(X=Ptr(dt), W=Ptr(dt), B=Ptr(dt), OUT=Ptr(dt), PRE=Ptr(dt), DOUT=Ptr(dt), DB_PART=Ptr("fp32"), M=M,
                 N=N, K=K, stride_xm=K, stride_wn=K, TUNE_M=triton_next_pow2(M))
        cx = dict(HAS_BIAS=bias, SAVE_PRE=save, APPROX_TANH=tanh, FAST_GELU=fast, DGELU=dgelu,
                  TMA_STORE=(N * 2) % 16 == 0, UPCAST=False, PRECISION="ieee" if dt == "fp32" else "tf32")
        case = (f"{dt} K={K} N={N} {'tanh' if tanh else 'erf'}{' bias' if bias else ''}{' pre' if save else ''}"
                f"{' dgelu' if dgelu else ''}{fast_tag(fast)}")
        _add(jobs, "linear_gelu_tma", lg._linear_gelu_tma, 90, case, v, cx, configs=configs)

    lin_tma("bf16", 768, 3072, "all")
    lin_tma("bf16", 768, 3072, [1], save=False, dgelu=True)
    lin_tma("fp16", 1000, 1000, [1], bias=False, tanh=True, save=False)
    # The fast GELU maths in the BERT FFN's inference forward (every config: the epilogue's
    # registers differ) and in the recompute path's dgelu epilogue.
    lin_tma("bf16", 768, 3072, "all", save=False, fast=True)
    lin_tma("bf16", 768, 3072, [1], save=False, dgelu=True, fast=True)
    if FULL:
        lin(90, "bf16", 768, "first", tanh=True)
        for arch in ARCHS:
            lin(arch, "fp32", 768, "all", bias=False)
