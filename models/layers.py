"""Transformer layers on the fused ops: attention, add+LayerNorm, GELU feed-forward, blocks.

Every layer takes `backend` (None = the backend in force, see fuseformer.kernels.set_backend)
and calls only the public ops of fuseformer.kernels, so the same module runs the Triton,
CUDA or reference kernels. The exception is the `torch` backend: the reference is readable
math (attention builds an L x L matrix), slower than PyTorch's own fused functions, so there
the layers call F.scaled_dot_product_attention, F.layer_norm and F.gelu(F.linear(...)),
which compute the same (the models' tests hold them to the parity rule against transformers).
Which of the two a module runs is decided once (`torch_path`), not looked up per call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels as K
from ..kernels.backends import check_name
from ..kernels.checks import same_floats
from . import fused_block

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, nh, S, hs)


class StaticKVCache:
    """Every layer's keys and values in buffers allocated once, (B, heads, max_length, head
    dim), for decoding one token a step with no new shape or address: what a CUDA graph of the
    decoding step needs (GPT2LMHeadModel.generate(cuda_graph=True)).

    Built from a prefill's cache (one (k, v) per layer, each (B, heads, P, head dim)), copied
    into slots 0..P-1. `key_mask` (B, 1, 1, max_length) bool: the slots a query may attend (the
    prompt's real tokens, from `prompt_mask` (B, P), and each generated token once its step
    has run); `position` ((1,) long, on the device): the slot the next step writes. A step
    (GPT2Model.forward with this cache) marks its slot in key_mask, writes its key and value
    there in every layer, attends over the whole buffer under key_mask, and advances position:
    all on the device, no value read back."""

    def __init__(self, past, max_length: int, prompt_mask: torch.Tensor | None = None):
        k0 = self._check(past, max_length, prompt_mask)
        B, H, _, D = k0.shape
        self.keys = [k0.new_zeros(B, H, max_length, D) for _ in past]
        self.values = [k0.new_zeros(B, H, max_length, D) for _ in past]
        self.key_mask = torch.zeros(B, 1, 1, max_length, dtype=torch.bool, device=k0.device)
        self.position = torch.empty(1, dtype=torch.long, device=k0.device)
        self.max_length = max_length
        self.load(past, prompt_mask)

    @staticmethod
    def _check(past, max_length: int, prompt_mask):
        if not past or any(not isinstance(kv, (tuple, list)) or len(kv) != 2 for kv in past):
            raise ValueError("past must hold one (k, v) per layer")
        k0 = past[0][0]
        B, _, P, _ = k0.shape
        if max_length < P:
            raise ValueError(f"max_length ({max_length}) must be at least the cached length ({P})")
        if prompt_mask is not None and tuple(prompt_mask.shape) != (B, P):
            raise ValueError(f"prompt_mask must have shape ({B}, {P}), got {tuple(prompt_mask.shape)}")
        for k, v in past:
            if k.shape != k0.shape or v.shape != k0.shape:
                raise ValueError(f"every layer's k and v must have shape {tuple(k0.shape)}")
        return k0

    def load(self, past, prompt_mask: torch.Tensor | None = None) -> None:
        """Another prompt's cache into the same buffers (same batch, heads, head dim and layer
        count; its length up to max_length), then reset(): what a captured step replays on."""
        k0 = self._check(past, self.max_length, prompt_mask)
        buffer = self.keys[0]
        if len(past) != len(self.keys) or (k0.shape[0], k0.shape[1], k0.shape[3]) != (
                buffer.shape[0], buffer.shape[1], buffer.shape[3]):
            raise ValueError("past must have this cache's layers, batch, heads and head dim")
        if k0.dtype != buffer.dtype or k0.device != buffer.device:
            raise ValueError(f"past must be {buffer.dtype} on {buffer.device}, got {k0.dtype} on {k0.device}")
        P = k0.shape[2]
        for (k, v), kb, vb in zip(past, self.keys, self.values):
            kb[:, :, :P].copy_(k)
            vb[:, :, :P].copy_(v)
            # An earlier prompt's keys and values past P are masked, but a non-finite one would
            # still reach the output as 0 * inf through the masked probabilities.
            kb[:, :, P:].zero_()
            vb[:, :, P:].zero_()
        self.prompt_length = P
        self._prompt_mask = None if prompt_mask is None else prompt_mask.to(k0.device, torch.bool)
        self.reset()

    def __len__(self) -> int:
        return len(self.keys)

    def layer(self, i: int) -> "StaticLayerKV":
        return StaticLayerKV(self.keys[i], self.values[i], self.position)

    def reset(self) -> None:
        """Back to the state after the prompt: later slots unmarked, position = P (their keys and
        values stay, masked, until overwritten)."""
        P = self.prompt_length
        self.key_mask.zero_()
        self.key_mask[:, 0, 0, :P] = True if self._prompt_mask is None else self._prompt_mask
        self.position.fill_(P)


class StaticLayerKV:
    """One layer's view of a StaticKVCache: its key and value buffers and the shared position."""

    __slots__ = ("k", "v", "position")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor):
        self.k, self.v, self.position = k, v, position


# Any change of the global backend (set_backend, use_backend) moves this counter, so a module
# bound to backend=None notices it with one comparison.
_backend_version = K.backend_version


def check_backend(backend: str | None, what: str = "backend") -> str | None:
    """None (the backend in force) or a valid backend name, refused where it is given."""
    return None if backend is None else check_name(backend, what)


def runs_torch(backend: str | None, device: torch.device) -> bool:
    """True when this call would run the torch reference (so PyTorch's fused ops are equal)."""
    name = K.get_backend() if backend is None else backend
    return name == "torch" or (name == "auto" and device.type != "cuda")


def torch_path(owner, backend: str | None, x: torch.Tensor) -> bool:
    """runs_torch, decided once per (backend, device kind, global backend) and kept on `owner`.

    The forward then pays one tuple comparison instead of the backend lookup. While
    torch.compile traces, the decision is made at trace time and nothing is stored."""
    if torch.compiler.is_compiling():
        return runs_torch(backend, x.device)
    key = (backend, x.is_cuda, _backend_version())
    plan = owner.__dict__.get("_torch_path_plan")
    if plan is None or plan[0] != key:
        plan = (key, runs_torch(backend, x.device))
        owner.__dict__["_torch_path_plan"] = plan  # not nn.Module.__setattr__: a plain cache
    return plan[1]


class BackendChoice:
    """Mixin for modules that run the fused ops: `backend` is checked where it is given
    (a misspelt name fails in the constructor or set_backend, not at the first forward)."""

    _backend: str | None = None

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self.__dict__["_backend"] = check_backend(name)

    def uses_torch(self, x: torch.Tensor) -> bool:
        return torch_path(self, self._backend, x)


def attention(q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale, backend, use_torch: bool):
    """softmax(q k^T * scale + mask) v, causal (top-left) and masked when both are given. On the
    torch backend PyTorch's SDPA computes the same as the reference without its L x L matrix;
    it takes a mask or is_causal, not both, so there the causal part is folded into the mask.
    The fused op takes both: a causal model's key-padding mask (GPT-2 given an attention_mask)
    stays a (B, 1, 1, S) row that its kernels read once per program, and they still skip the
    tiles past the diagonal; folded, it was a dense (B, 1, T, S) mask built every layer, read
    per tile, with every tile computed."""
    if use_torch:
        if is_causal and attn_mask is not None:
            diag = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            attn_mask, is_causal = and_causal(attn_mask, diag), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)
    return K.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, backend=backend)


def add_layer_norm(x, residual, weight, bias, eps: float, dropout_p: float, prenorm: bool, backend, use_torch: bool):
    """K.add_layer_norm; on the torch backend through PyTorch's own fused LayerNorm."""
    if not use_torch:
        return K.add_layer_norm(x, residual, weight, bias, eps=eps, dropout_p=dropout_p, prenorm=prenorm,
                                backend=backend)
    h = F.dropout(x, dropout_p, True) if dropout_p > 0 else x
    h = h if residual is None else h + residual
    y = F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    return (y, h) if prenorm else y


def linear_gelu(x, weight, bias, approximate: str, backend, use_torch: bool):
    """K.linear_gelu; on the torch backend the reference itself, minus the custom-op dispatch."""
    if use_torch:
        return F.gelu(F.linear(x, weight, bias), approximate=approximate)
    return K.linear_gelu(x, weight, bias, approximate=approximate, backend=backend)


def _backend_repr(backend: str | None) -> str:
    return f"backend={backend or 'default'}"


class MultiHeadSelfAttention(BackendChoice, nn.Module):
    """Self-attention with one fused QKV projection and one attention call.

    `qkv` holds [W_q; W_k; W_v] stacked on the output dim, so q, k and v are strided views
    of a single matmul's result. `proj` is the output projection.
    """

    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float = 0.0,
                 causal: bool = False, bias: bool = True, backend: str | None = None):
        super().__init__()
        if num_heads <= 0 or hidden_size % num_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.attn_dropout = attn_dropout
        self.causal = causal
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, heads={self.num_heads}, causal={self.causal}, "
                f"{_backend_repr(self.backend)}")

    def attend(self, q, k, v, attn_mask=None, is_causal=False):
        """softmax(q k^T / sqrt(hs)) v on (B, nh, T, hs) tensors, by the chosen backend."""
        p = self.attn_dropout if self.training else 0.0
        return attention(q, k, v, attn_mask, p, is_causal, None, self._backend, self.uses_torch(q))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                past_kv: KVCache | None = None, use_cache: bool = False):
        """x (B, T, C). attn_mask: bool, True = attend, (B, 1, 1, S) for key padding or
        (B, 1, T, S) in general, or float, added to the scores. With `past_kv` the new
        keys/values are appended to the cache and the queries see the whole cache; with
        `use_cache` returns (out, (k, v))."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if isinstance(past_kv, StaticLayerKV):
            # One token into its slot of the static buffers, then attention over all of them
            # under the cache's key mask (attn_mask): the token sits at the latest marked slot,
            # so it may see every marked key and no causal mask is needed.
            if T != 1:
                raise ValueError(f"a StaticKVCache takes one token a step, got {T}")
            past_kv.k.index_copy_(2, past_kv.position, k)
            past_kv.v.index_copy_(2, past_kv.position, v)
            k, v, is_causal, present = past_kv.k, past_kv.v, False, past_kv
        else:
            past = None if past_kv is None else past_kv[0].shape[2]
            attn_mask, is_causal = self.cache_mask(attn_mask, T, past, x.device)
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, S, hs)
                v = torch.cat([past_kv[1], v], dim=2)
            present = (k, v)
        y = self.attend(q, k, v, attn_mask, is_causal)  # (B, nh, T, hs)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))
        return (y, present) if use_cache else y

    def cache_mask(self, attn_mask, T: int, past: int | None, device):
        """(mask, is_causal) for T queries after `past` cached keys (None: no cache), here and
        in the one-node block (models/fused_block.py)."""
        if past is None:
            return attn_mask, self.causal
        if self.causal and T > 1:
            # The cache shifts the diagonal: query i sits at position past + i, so a top-left
            # causal mask would be wrong; build the bottom-right one. One new token (a decoding
            # step) sits last and sees every key: no mask to build.
            diag = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
            attn_mask = and_causal(attn_mask, diag)
        return attn_mask, False

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x (total, C): sequences packed back to back, no padding (varlen attention)."""
        total, C = x.shape
        qkv = self.qkv(x).view(total, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # each (total, nh, hs)
        p = self.attn_dropout if self.training else 0.0
        y = K.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               dropout_p=p, is_causal=self.causal, backend=self.backend)
        return self.proj(y.reshape(total, C))


class AddLayerNorm(BackendChoice, nn.Module):
    """y = LayerNorm(residual + dropout(x)) in one fused op.

    Dropout applies to the branch `x` being added to the residual stream; with no residual
    there is no branch and no dropout (the embeddings' LayerNorm). `prenorm=True` also
    returns the new residual stream, for pre-LN blocks.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps, self.dropout, self.backend = eps, dropout, backend

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, dropout={self.dropout}, {_backend_repr(self.backend)}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        p = self.dropout if (self.training and residual is not None) else 0.0
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, p, prenorm, self._backend,
                              self.uses_torch(x))


class FeedForward(BackendChoice, nn.Module):
    """proj(GELU(fc(x))), the first half fused (linear_gelu). approximate: 'none' or 'tanh'."""

    def __init__(self, hidden_size: int, intermediate_size: int, approximate: str = "none",
                 backend: str | None = None):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.fc = nn.Linear(hidden_size, intermediate_size)
        self.proj = nn.Linear(intermediate_size, hidden_size)
        self.approximate, self.backend = approximate, backend

    def extra_repr(self) -> str:
        return f"gelu={self.approximate}, {_backend_repr(self.backend)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear_gelu(x, self.fc.weight, self.fc.bias, self.approximate, self._backend, self.uses_torch(x))
        return self.proj(h)


class TransformerBlock(nn.Module):
    """One attention + feed-forward block, post-LN (BERT, ALBERT) or pre-LN (GPT-2).

    post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x))           forward(x) -> x
    pre-LN:  the residual add of each branch is fused with the next LayerNorm, across
             blocks too, so forward(h, residual) -> (branch output, residual stream) and the
             caller's final LayerNorm adds the last branch. For the first block pass the
             embeddings as `h` and residual=None.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, *,
                 eps: float = 1e-5, attn_dropout: float = 0.0, hidden_dropout: float = 0.0,
                 approximate: str = "none", prenorm: bool = False, causal: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.prenorm = prenorm
        self.attn = MultiHeadSelfAttention(hidden_size, num_heads, attn_dropout, causal, backend=backend)
        self.attn_norm = AddLayerNorm(hidden_size, eps, hidden_dropout, backend)
        self.ffn = FeedForward(hidden_size, intermediate_size, approximate, backend)
        self.ffn_norm = AddLayerNorm(hidden_size, eps, hidden_dropout, backend)

    def set_backend(self, backend: str | None) -> None:
        backend = check_backend(backend)
        for m in self.modules():
            if isinstance(m, BackendChoice):
                m.backend = backend

    def forward(self, x, residual=None, attn_mask=None, past_kv=None, use_cache=False, packed=None):
        """`packed` = (cu_seqlens, max_seqlen) runs post-LN attention on packed (total, C) tokens."""
        if packed is None and fused_block.enabled():
            out = _fused_block_call(self, x, residual, attn_mask, past_kv, use_cache)
            if out is not None:
                return out
        if not self.prenorm:
            if packed is not None:
                a = self.attn.forward_packed(x, *packed)
            else:
                a = self.attn(x, attn_mask)
            x = self.attn_norm(a, x)
            return self.ffn_norm(self.ffn(x), x)
        h, residual = self.attn_norm(x, residual, prenorm=True)  # residual += drop(x); h = LN(residual)
        out = self.attn(h, attn_mask, past_kv=past_kv, use_cache=use_cache)
        a, kv = out if use_cache else (out, None)
        h, residual = self.ffn_norm(a, residual, prenorm=True)
        y = self.ffn(h)
        return (y, residual, kv) if use_cache else (y, residual)


_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks,
                 nn.modules.module._global_backward_hooks, nn.modules.module._global_backward_pre_hooks)


def _positive(v) -> bool:
    return type(v) in (float, int) and v > 0


def _probability(p) -> bool:
    """A dropout probability the fused node runs as the per-op path would: [0, 1) (the per-op
    path refuses a negative one, and runs p = 1 on the reference)."""
    return type(p) in (float, int) and 0.0 <= p < 1.0


def _fused_block_call(block: TransformerBlock, x: torch.Tensor, residual: torch.Tensor | None,
                      attn_mask: torch.Tensor | None, past_kv=None, use_cache: bool = False):
    """block(x, residual, attn_mask, past_kv, use_cache) as one fused node
    (models/fused_block.py), or None where this call must take the per-op path: modules of
    other types (a LoRA layer in place of a Linear, say) or with hooks (the fused node would
    skip them), torch.compile (it traces the per-op path's custom ops), autocast (the per-op
    path casts per op), anything but (B, T, C) inputs of one floating dtype and device with the
    weights, an op that resolves to torch, or a KV cache anywhere but in a pre-LN block's
    inference (GPT-2's generate: each decoding step is host time only)."""
    # Submodules and parameters through their dicts: nn.Module.__getattr__ costs ~1 µs a
    # lookup here, ~40 of them for a block's twelve parameters.
    mods = block._modules
    attn, n1, ffn, n2 = mods["attn"], mods["attn_norm"], mods["ffn"], mods["ffn_norm"]
    if (type(attn) is not MultiHeadSelfAttention or type(n1) is not AddLayerNorm or type(ffn) is not FeedForward
            or type(n2) is not AddLayerNorm or torch.compiler.is_compiling() or x.dim() != 3
            or torch.is_autocast_enabled(x.device.type) or any(_GLOBAL_HOOKS)):
        return None
    qkv, proj = attn._modules["qkv"], attn._modules["proj"]
    fc, fc2 = ffn._modules["fc"], ffn._modules["proj"]
    # Exact types: a subclass (LoRA, a parametrized weight) computes something else.
    if (type(qkv) is not nn.Linear or type(proj) is not nn.Linear or type(fc) is not nn.Linear
            or type(fc2) is not nn.Linear):
        return None
    for m in (attn, qkv, proj, n1, ffn, fc, fc2, n2):  # a loop, not any(genexpr): ~1 µs less a block
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None
    backend = attn._backend
    if n1._backend != backend or ffn._backend != backend or n2._backend != backend or attn.uses_torch(x):
        return None
    # Written out: the generator over (module, name) pairs cost ~0.7 µs a block more.
    params = (qkv._parameters["weight"], qkv._parameters["bias"], proj._parameters["weight"], proj._parameters["bias"],
              n1._parameters["weight"], n1._parameters["bias"], fc._parameters["weight"], fc._parameters["bias"],
              fc2._parameters["weight"], fc2._parameters["bias"], n2._parameters["weight"], n2._parameters["bias"])
    prenorm = block.prenorm
    if not prenorm:
        residual = None  # a post-LN block's residual is x itself
    # Whatever the per-op path would refuse, it refuses with its own message.
    if (not same_floats(x, residual, *params) or x.numel() == 0 or x.shape[-1] != params[0].shape[1]
            or (residual is not None and residual.shape != x.shape)):
        return None
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.requires_grad
                                  or attn_mask.device != x.device or attn_mask.dtype not in (torch.bool, x.dtype)):
        return None
    eps1, eps2, approximate = n1.eps, n2.eps, ffn.approximate
    if not (_positive(eps1) and _positive(eps2)) or approximate not in ("none", "tanh"):
        return None
    # Each module's own training flag, as the per-op path reads them; AddLayerNorm's rule:
    # dropout on the branch added to a residual (none in a pre-LN block's first LN without one).
    pa = attn.attn_dropout if attn.training else 0.0
    p1 = n1.dropout if n1.training and (residual is not None or not prenorm) else 0.0
    p2 = n2.dropout if n2.training else 0.0
    if not (_probability(pa) and _probability(p1) and _probability(p2)):
        return None
    # Per op, the per-op path trains (keeps activations, may pick other kernels) when that op's
    # inputs require grad: all four do once the block's input does. A block whose input does
    # not but some of whose weights do (frozen layers below trainable ones) mixes the two.
    grad = torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))
    if not grad and torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        return None
    past = None
    if past_kv is not None or use_cache:
        if grad or not prenorm:
            return None
        if past_kv is not None:
            # Whatever torch.cat would refuse, it refuses on the per-op path.
            B, T, C = x.shape
            shape = (B, attn.num_heads, None, C // attn.num_heads)
            # `is None` each, not `None in past_kv`: that compares each tensor with None through
            # Tensor.__eq__'s exception path, ~12 µs a tensor, every decoding step of every block.
            if (not isinstance(past_kv, (tuple, list)) or len(past_kv) != 2
                    or past_kv[0] is None or past_kv[1] is None or not same_floats(x, *past_kv)
                    or any(t.dim() != 4 or (t.shape[0], t.shape[1], None, t.shape[3]) != shape for t in past_kv)
                    or past_kv[0].shape[2] != past_kv[1].shape[2]):
                return None
            past = past_kv[0].shape[2]
    mask, is_causal = attn.cache_mask(attn_mask, x.shape[1], past, x.device)
    planned = fused_block.plan(x, mask, is_causal, attn.num_heads, pa, p1, p2, params[6].shape[0], approximate,
                               backend, grad, keys=x.shape[1] + (past or 0))
    if planned is None:
        return None
    mask4, names = planned
    cfg = (prenorm, attn.num_heads, is_causal, float(eps1), float(eps2), float(pa), float(p1), float(p2), approximate)
    return fused_block.run(x, residual, mask4, params, cfg, names, grad, past_kv, use_cache)


def attention_mask_for(attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
                       name: str = "attention_mask"):
    """Hugging Face's attention_mask -> the attention's mask, or None.

    (B, S) 1/0 -> bool (B, 1, 1, S), True = attend (the kernels' key-padding fast path).
    A 4-D mask as transformers builds them, (B or 1, 1 or heads, 1 or T, S), passes through:
    bool (True = attend), or float added to the scores (0 = attend, a large negative number =
    masked), converted to the model's `dtype` with -inf clamped to its lowest finite value."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2 and shape == (batch, length):
        return attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() == 4 and shape[0] in (1, batch) and shape[-1] == length:
        if attention_mask.is_floating_point():
            return attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min)
        return attention_mask.bool()
    raise ValueError(f"{name} must have shape (batch, key_length) = ({batch}, {length}), or be a 4-D "
                     f"(batch, 1, query_length, {length}) mask, got {shape}")


def and_causal(attn_mask: torch.Tensor | None, diag: torch.Tensor) -> torch.Tensor:
    """Combine a bool or additive float mask with a bool causal pattern (True = may attend)."""
    if attn_mask is None:
        return diag
    if attn_mask.is_floating_point():
        return attn_mask.masked_fill(~diag, torch.finfo(attn_mask.dtype).min)
    return attn_mask & diag


def init_weights(module: nn.Module, std: float) -> None:
    """BERT/GPT-2 initialisation: normal(0, std) weights, zero biases, LayerNorm = identity."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, (AddLayerNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def scale_residual_projections(module: nn.Module, std: float, n_residual_layers: int) -> None:
    """GPT-2: weights writing into the residual stream get std / sqrt(N), N = 2 per block."""
    for name, p in module.named_parameters():
        if name.endswith("attn.proj.weight") or name.endswith("ffn.proj.weight"):
            nn.init.normal_(p, 0.0, std / math.sqrt(n_residual_layers))


# The vocabulary projection's rows are padded to a multiple of this on the GPU (VocabLogits),
# for calls of at least VOCAB_PAD_MIN_TOKENS tokens.
VOCAB_ALIGN = 64
VOCAB_PAD_MIN_TOKENS = 1024


_HALF = (torch.float16, torch.bfloat16)


def vocab_padding(weight: torch.Tensor, tokens: int) -> int:
    """How many rows VocabLogits adds to a (V, C) projection `weight` for a call on `tokens`
    tokens: 0 off the GPU, for a matmul outside fp16/bf16 (the weight's dtype, or autocast's
    under autocast: mixed-precision training keeps fp32 weights), when V is a multiple of 8
    already, or for fewer than VOCAB_PAD_MIN_TOKENS tokens (a decoding step: there the GEMM
    is a read of the weight, which a padded copy would triple)."""
    rows = weight.shape[0]
    if tokens < VOCAB_PAD_MIN_TOKENS or not weight.is_cuda or rows % 8 == 0:
        return 0
    half = weight.dtype in _HALF or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in _HALF)
    return -rows % VOCAB_ALIGN if half else 0


class VocabLogits(BackendChoice, nn.Module):
    """logits = F.linear(h, weight, bias) over a vocabulary, and the cross-entropy loss on them.

    On the GPU the logits of a call on many tokens are computed with the vocabulary padded to
    a multiple of VOCAB_ALIGN rows, and the result is the first V columns of the padded logits
    (a view: its rows are VOCAB_ALIGN-padded apart).

    Why: the output's row stride is V elements, and BERT's 30522 and GPT-2's 50257 are not
    multiples of 8, so in fp16/bf16 the rows of the logits are not 16-byte aligned and cuBLAS
    cannot take its fastest tensor-core kernels (NVIDIA's shape guideline for tensor cores;
    nanoGPT pads GPT-2's vocabulary to 50304 for this, and torch.compile's pad_mm pass pads
    such matmuls). These projections are the largest GEMMs of the models: GPT-2's LM head at
    B8 L512 is 316 GFLOP, more than a quarter of the forward; BERT's MLM decoder a fifth of a
    training step. On the H200 (2026-11-27) our GPT-2 B8 L512 inference took 5.22 ms in a CUDA
    graph against 2.81 for HF + torch.compile, whose layers are no faster than ours.

    The padded weight is made per call (F.pad: one read and one write of the weight, 77 MB
    for GPT-2 in fp16, ~40 µs at H200 bandwidth, against a GEMM of milliseconds at 4096 tokens).
    It is not kept between calls: a copy keyed on the weight's version counter would go stale
    after a write through `.data` (EMA updates, weight initialisers), which no counter sees.
    Its padding rows have weight 0 and bias -inf: their logits are -inf, no probability, so
    `loss` computes the cross-entropy over the whole padded logits (with classes = V) and its
    gradient reaches the GEMM in the GEMM's own layout, where slicing would have copied it
    into a zero-filled padded buffer. F.pad's backward drops the padding's gradient."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        V = weight.shape[0]
        # torch.compile pads matmuls itself (pad_mm).
        pad = 0 if torch.compiler.is_compiling() else vocab_padding(weight, h.numel() // max(h.shape[-1], 1))
        if pad == 0:
            return F.linear(h, weight, bias)
        if bias is None:
            bias = weight.new_zeros(V)
        full = F.linear(h, F.pad(weight, (0, 0, 0, pad)), F.pad(bias, (0, pad), value=float("-inf")))
        logits = full[..., :V]
        logits._fuseformer_padded = full  # for `loss`; the same memory, nothing more is kept
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """vocab_loss on this module's backend."""
        return vocab_loss(logits, labels, ignore_index, self._backend)


def vocab_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
               backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of `labels` (logits.shape[:-1], or as many tokens flattened) under
    `logits`, on `backend` (None: the backend in force; fuseformer.kernels.cross_entropy): over
    the padded logits when `logits` is VocabLogits' view of them (see its docstring)."""
    V = logits.shape[-1]
    if labels.shape != logits.shape[:-1] and labels.numel() == logits.numel() // max(V, 1):
        labels = labels.reshape(logits.shape[:-1])  # flattened labels, as transformers takes them
    full = getattr(logits, "_fuseformer_padded", None)
    if full is not None and full.data_ptr() == logits.data_ptr() and full.stride() == logits.stride():
        logits = full
    if (K.get_backend() if backend is None else backend) == "cuda":
        # csrc/ has no cross-entropy: a model on the cuda backend takes auto's (the Triton
        # kernel on a GPU) rather than failing at its loss.
        backend = "auto"
    return K.cross_entropy(logits, labels, ignore_index, classes=V, backend=backend)


def wide(t: torch.Tensor) -> torch.Tensor:
    """Losses in float32 at least, float64 kept (parity tests run whole models in float64)."""
    return t if t.dtype == torch.float64 else t.float()
