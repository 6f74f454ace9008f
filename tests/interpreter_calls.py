"""Triton's interpreter, made to patch triton.language once per kernel launch rather than at
every call of a @triton.jit helper inside the kernel.

The interpreter swaps triton.language's builtins for numpy versions when a kernel starts
(GridExecutor) and puts them back when it ends. It also calls the same patching at every call
of a device function (InterpretedFunction.__call__), where the language is already swapped:
that pass changes nothing (the swapped members are no longer builtins, so none is replaced),
but it walks every member of tl, tl.core, tl.math and the tensor classes with
inspect.getmembers. Our kernels call helpers per row or tile, so that walk took a third of a
BERT convergence run (24 of 71 s under cProfile); the convergence and fused-block modules ran in
97 s with it skipped, 159 s without.

Here a call's patching is skipped when every language module the function sees (tl, tl.core:
separate module objects, each patched only when a function that names it is called) is already
patched, which this tells by its `load` no longer being the builtin. Triton's own helpers
(tl.zeros, in triton/language/standard.py) name tl.core where our kernels name tl, so their
first call still patches tl.core. Nothing is changed where this Triton's interpreter lacks
these names: it then runs as shipped.
"""
from __future__ import annotations

import inspect


def install() -> bool:
    """Wrap the interpreter's _patch_lang; False (and nothing changed) where this Triton's
    interpreter lacks what the wrapper relies on."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    patch_lang = getattr(interp, "_patch_lang", None)
    scope_type = getattr(interp, "_LangPatchScope", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if patch_lang is None or scope_type is None or is_builtin is None or not is_builtin(tl.load):
        return False

    langs_of: dict = {}  # function -> the language modules its globals name (they do not change)

    def patch_lang_once(fn):
        langs = langs_of.get(fn)
        if langs is None:
            named = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
            langs = langs_of[fn] = tuple({id(v): v for v in named}.values())
        if langs and not any(is_builtin(lang.load) for lang in langs):  # all patched for this launch
            return scope_type()  # an empty scope, which the device-function call drops unused
        return patch_lang(fn)

    patch_lang_once.__wrapped__ = patch_lang
    interp._patch_lang = patch_lang_once
    return True
