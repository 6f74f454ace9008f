"""generate() for causal LMs (GPT2LMHeadModel): greedy or sampled decoding with a KV cache,
Hugging Face's keywords and results.

Left-padded batches: a row's tokens get positions counted from its first real token (as
transformers computes position_ids from attention_mask), padding is masked out of every
step, and a row that produced eos_token_id is filled with pad_token_id until all are done.
"""
from __future__ import annotations

import weakref

import torch


def _token_ids(value, name: str) -> list[int]:
    """None, an int or a list of ints -> a list (Hugging Face accepts several eos ids)."""
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return values


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer (or None for no limit), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _new_token_budget(prompt_len: int, max_new_tokens: int | None, max_length: int | None, n_positions: int) -> int:
    if prompt_len > n_positions:
        raise ValueError(f"input_ids has {prompt_len} tokens, longer than the position table (n_positions={n_positions})")
    if max_new_tokens is None:  # Hugging Face: max_new_tokens wins over max_length
        if max_length is None:
            max_new_tokens = 20
        elif max_length < prompt_len:
            raise ValueError(f"max_length ({max_length}) is shorter than the prompt ({prompt_len} tokens); "
                             "max_length counts the prompt, max_new_tokens does not")
        else:
            max_new_tokens = max_length - prompt_len
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens > n_positions:
        # Refused before any work: the position table has no row for the later tokens.
        raise ValueError(f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} would reach "
                         f"position {prompt_len + max_new_tokens}, beyond the position table "
                         f"(n_positions={n_positions})")
    return max_new_tokens


def next_token_logits_filter(logits: torch.Tensor, temperature: float, top_k: int | None,
                             top_p: float | None) -> torch.Tensor:
    """Hugging Face's warpers in their order: temperature, top-k, then top-p (nucleus: keep the
    most likely tokens whose probabilities sum to top_p, at least one)."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int | None = None, *,
             attention_mask: torch.Tensor | None = None, max_length: int | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, use_cache: bool = True, static_cache: bool = False,
             cuda_graph: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, P) prompt -> (B, P + n) ids, n <= max_new_tokens (default 20, or max_length - P).

    Greedy unless do_sample. eos_token_id / pad_token_id default to the model's config; with
    no pad token the eos token pads finished rows, as in transformers. With the cache each
    step feeds only the newest token; use_cache=False reruns the whole prefix (for checking).

    static_cache=True decodes on a StaticKVCache (models/layers.py): buffers for P + n tokens
    allocated after the prompt's forward, each step writing its slot in place. cuda_graph=True
    (CUDA, eval mode, implies static_cache) captures that step once in a CUDA graph and replays
    it per token: a step then costs one graph launch instead of a Python call and a launch per
    op (at small batches an eager step is mostly host time)."""
    config = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a (batch, prompt_length) integer tensor, "
                         f"got {getattr(input_ids, 'shape', type(input_ids))}")
    B, P = input_ids.shape
    budget = _new_token_budget(P, max_new_tokens, max_length, config.n_positions)
    _check_sampling(do_sample, temperature, top_k, top_p)
    eos = _token_ids(eos_token_id if eos_token_id is not None else config.eos_token_id, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    device = input_ids.device
    eos_t = torch.tensor(eos, device=device)
    if cuda_graph:
        static_cache = True
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device, got {device}")
        if model.training:
            raise ValueError("cuda_graph=True needs the model in eval mode (model.eval()): a CUDA graph replays "
                             "one fixed dropout pattern")
    if static_cache and not use_cache:
        raise ValueError("static_cache=True decodes on a cache: it needs use_cache=True")

    positions = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, P):
            raise ValueError(f"attention_mask must have the prompt's shape ({B}, {P}), got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.long()
        # Positions count from each row's first real token (left padding), as transformers does.
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    ids, past = input_ids, None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    step = step_ids = None  # the static cache's decoding step (a CUDA graph's replay with cuda_graph)
    for _ in range(budget):
        if step is not None:
            step_ids.copy_(ids[:, -1:])
            logits = step()[:, -1, :].float()  # (B, V)
        else:
            if use_cache and past is not None:
                step_ids, step_pos = ids[:, -1:], positions[:, -1:] if positions is not None else None
            else:
                step_ids, step_pos = ids, positions
            out = model(step_ids, past_key_values=past, attention_mask=attention_mask, position_ids=step_pos,
                        use_cache=use_cache)
            past = out.past_key_values if use_cache else None
            logits = out.logits[:, -1, :].float()  # (B, V)
            if static_cache and budget > 1:
                # After the prompt: its cache moves into buffers for every token to come.
                following = positions[:, -1:] + 1 if positions is not None else torch.full((B, 1), P, device=device)
                step, step_ids = _static_step(model, past, P + budget, attention_mask, following, cuda_graph)
                past = out = None  # the prompt's cache lives on in the static buffers only
        if do_sample:
            probs = next_token_logits_filter(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        else:
            nxt = logits.argmax(-1)
        if eos:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if attention_mask is not None and step is None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if eos:
            unfinished &= ~torch.isin(nxt, eos_t)
            if not bool(unfinished.any()):  # one read per step, as transformers does
                break
    return ids


# generate(cuda_graph=True)'s captured steps, per model (dropped with it): (batch, buffer
# length, dtype, device, the tensors' addresses, the settings) -> (cache, step_ids, step_pos,
# first positions, replay), the latest _KEEP_STEPS of them. A later call of the same bucket
# loads its prompt into the same buffers and replays the same graph: no warm-up, no capture.
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_KEEP_STEPS = 2


def _buffer_length(needed: int, limit: int) -> int:
    """Slots for `needed` tokens, rounded up to a power of two (at least 64, at most the position
    table), so that calls of nearby lengths share one captured step. Our attention kernels never
    load the key tiles past the last marked slot (the spare slots cost a mask row read); the
    torch backend's SDPA computes over all of them."""
    return min(limit, max(64, 1 << (needed - 1).bit_length()))


def _static_step(model, past, max_length: int, prompt_mask, positions, cuda_graph: bool):
    """(step, step_ids): step() feeds step_ids (B, 1) at `positions` (B, 1), the next token's
    positions, advanced by each step, to `model` on a StaticKVCache built from the prompt's
    cache, and returns the logits (B, 1, V). With cuda_graph the step is captured once per
    bucket (_STEPS) and replayed: the returned logits are the graph's static output,
    overwritten by the next step. Each warm-up call before the capture starts from the state
    after the prompt (three calls in a row would write slots past the buffers when only two
    tokens are asked for), and so does the first replay."""
    from ..kernels import backends
    from .graphs import capture_cuda_graph
    from .layers import BackendChoice, StaticKVCache

    k0 = past[0][0]
    # Rounded up eagerly too: the eager step then runs the graph's shapes (and kernels).
    max_length = _buffer_length(max_length, model.config.n_positions)
    entry = key = None
    if cuda_graph:
        tensors = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
        # The modules' own backends (set_backend) as well as the global settings; inference
        # mode too: buffers made under it cannot be written outside it.
        chosen = tuple(m._backend for m in model.modules() if isinstance(m, BackendChoice))
        key = (positions.shape[0], max_length, k0.dtype, k0.device, tensors, chosen, backends.settings_signature(),
               torch.is_inference_mode_enabled())
        steps = _STEPS.setdefault(model, {})
        for stale in [k for k in steps if k[4] != tensors]:  # weights moved or recast: never replayed again
            del steps[stale]
        entry = steps.pop(key, None)
    with torch.no_grad():  # the buffers hold values, never a graph of the prompt's forward
        if entry is None:
            cache = StaticKVCache(past, max_length, prompt_mask)
            step_ids = torch.zeros(size=positions.shape, dtype=torch.long, device=positions.device)
            step_pos, first = positions.clone(), positions.clone()
        else:
            cache, step_ids, step_pos, first, replay = entry
            cache.load(past, prompt_mask)
            first.copy_(positions)

    def call():
        with torch.no_grad():
            logits = model(step_ids, past_key_values=cache, position_ids=step_pos, use_cache=True).logits
        step_pos.add_(1)
        return logits

    def restart():
        cache.reset()
        step_pos.copy_(first)

    def warm():  # every warm-up from the state after the prompt: its slot and positions exist
        restart()
        return call()

    if not cuda_graph:
        return call, step_ids
    if entry is None:
        replay = capture_cuda_graph(call, warm=warm)
    restart()
    steps[key] = (cache, step_ids, step_pos, first, replay)  # the latest last
    while len(steps) > _KEEP_STEPS:
        del steps[next(iter(steps))]
    return replay, step_ids


def release_cuda_graphs(model) -> None:
    """Drop `model`'s captured decoding steps (generate(cuda_graph=True)) and their buffers.
    Needed after changing what a step computes other than through its weights' values, the
    modules' backends or the kernel settings (those are part of a step's key): a module's
    attribute such as a feed-forward's `approximate`, say."""
    _STEPS.pop(model, None)


__all__ = ["generate", "release_cuda_graphs"]
