"""The contrastive loss's hot spot: a softmax over every queue entry for every anchor, and its moments.

For anchors ``x`` (A, s) already divided by tau, queue entries ``k`` (C, s) and a mask bias ``b`` (C,) (0 for a
filled slot, -1e30 for an empty one) the loss needs, per anchor, ``lse = logsumexp_c(x . k_c + b_c)`` and the
softmax-weighted mean entry ``sum_c softmax_c * k_c``. With s = 4 and C = 1024 (the quickstart's 8 experts x 128)
the work is millions of tiny dot products and exps per layer, which no matmul library runs well. Three ways, in
order of preference on CPU in float32 (others: the matmul path):

- :func:`bounded_softmax_moments`, compiled by TorchInductor (:class:`CompiledKernels`): one C++ loop per anchor
  keeps the logit, exp, sum and the s weighted sums in registers. 3.3x faster than the next option at s=4 (0.9 vs 3.0 ms
  for 2176 anchors x 1024 entries, 1 thread). The whole layer term (normalise, gather, loss, closed-form gradient)
  and the queue push are compiled, once per process and layer shape, in 2-5 s (Inductor caches the C++ on disk);
  only the anchor count is a dynamic size. Needs a C++ compiler.
- PyTorch's fused CPU attention kernel with the anchors as queries (private op; online softmax, no (A, C) buffer).
- matmul + softmax + matmul.

Which one runs is :attr:`MoELoRAConfig.contrastive_kernel <moelora_lit.config.MoELoRAConfig>` (docs/design.md §8):

- ``"auto"`` (default): the compiled loop on CPU in float32, the fused attention kernel otherwise. The environment
  variable ``MOELORA_COMPILE_CONTRASTIVE=0`` overrides ``"auto"`` to ``"attention"`` (read at every call; the only
  place it is read): a machine without a C++ compiler, or a test suite that would spend its time compiling.
- ``"compiled"``: the compiled loop on CPU in float32, whatever the environment variable says.
- ``"attention"``: never compile (the fused attention kernel on CPU, matmul + softmax elsewhere).

The setting covers the loss and the queue push (:func:`moelora_lit.aux.push_into`). Whatever the choice, a compile
that fails warns once and that kernel falls back for the rest of the process, a shift bound past
:data:`MAX_SHIFT` (a very low temperature) falls back for that call, and a forked child (Lightning's ``ddp_fork``)
falls back silently: :data:`COMPILED` owns that state.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

MASKED_LOGIT = -1e30  # finite stand-in for -inf: an unfilled slot gets probability exactly 0, never NaN

ENVIRONMENT_OVERRIDE = "MOELORA_COMPILE_CONTRASTIVE"
# exp(logit - shift) with shift >= every logit of the anchor lies in [exp(-2 shift), 1]; past exp(-80) float32
# leaves its normal range, so a larger bound means "use another path" (tau < 0.025 with unit vectors).
MAX_SHIFT = 40.0

RECOMPILE_LIMIT = 64  # compiled versions per kernel and process (one per distinct layer shape and temperature)

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def bounded_softmax_moments(scaled: Tensor, entries: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse, expected, largest shift)`` without a max pass: each anchor's shift is a bound of its logits.

    ``scaled`` (A, s), ``entries`` (C, s), ``bias`` (C,). By Cauchy-Schwarz ``|x . k| <= |x| max|k|``, so
    ``exp(logit - shift)`` cannot overflow; the caller checks the returned largest shift against
    :data:`MAX_SHIFT` (underflow). The logits are written as s broadcast products so that Inductor fuses
    them, the exp and the s + 1 reductions into one pass over the entries.
    """
    dim = scaled.shape[1]
    # Anchors and entries as (s, A) and (s, C) rows: contiguous vector loads along both in the fused loop
    # (1.4x faster at 2 threads than the (A, s) layout, whose strided loads Inductor repeats per entry). The
    # anchors' rows are built by ``cat``, which Inductor writes to a buffer: a transposed copy it would fuse into
    # the loop, gathering 16 strided anchors per entry (0.85-0.89 against 1.00 ms per layer at 2 threads).
    scaled_t = torch.cat([scaled[:, d][None] for d in range(dim)])                     # (s, A)
    keys_t = entries.T.contiguous()                                                     # (s, C)
    shift = scaled_t.norm(dim=0) * keys_t.norm(dim=0).amax()                            # (A,)
    logits = bias - shift[:, None]                                                      # (A, C)
    for d in range(dim):
        logits = logits + scaled_t[d][:, None] * keys_t[d]
    probs = logits.exp()
    norm = probs.sum(-1).clamp_min(torch.finfo(probs.dtype).tiny)                      # 0 if every slot is empty
    moments = torch.stack([(probs * keys_t[d]).sum(-1) for d in range(dim)], -1)       # (A, s)
    return norm.log() + shift, moments / norm[:, None], shift.amax()


def softmax_moments(scaled: Tensor, entries: Tensor, bias: Tensor,
                    need_expectation: bool = True) -> tuple[Tensor, Tensor | None, None]:
    """``(lse, expected or None, None)`` exactly, by the fused attention kernel on CPU, else matmul + softmax."""
    lhs = torch.cat([scaled, scaled.new_ones(scaled.shape[0], 1)], 1)                  # the bias rides in the matmul
    keys = torch.cat([entries, bias[:, None]], 1)                                      # (C, s+1)
    if lhs.is_cpu and lhs.dtype == torch.float32 and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(lhs[None, None], keys[None, None], keys[None, None], scale=1.0)
        return lse[0, 0], out[0, 0, :, :-1] if need_expectation else None, None
    logits = lhs @ keys.T                                                               # (A, C)
    if not need_expectation:
        return torch.logsumexp(logits, -1), None, None
    top = logits.amax(-1)
    # In place on CPU: a second (A, C) allocation costs more than the softmax itself there.
    probs = torch.softmax(logits, -1, out=logits if logits.is_cpu else None)
    # The largest probability is 1 / sum exp(logit - max), so lse = max - log(max prob): two cheap amax
    # passes instead of logsumexp's second exp pass.
    return top - probs.amax(-1).log(), (entries.T @ probs.T).T, None  # probs @ entries; ~3x faster on CPU


def static_shapes(args: tuple, dynamic: tuple[int, ...] = (0, 1, 2)) -> None:
    """Inside a compiled function: specialise every dimension of ``args`` but the first of those at ``dynamic``.

    Dynamo would otherwise make a dimension dynamic once it has seen two values of it in the process (another
    layer shape), which changes the generated kernel, its speed and its rounding with the process's history: an
    exact resume needs the same kernel every time.
    """
    if not torch.compiler.is_compiling():
        return
    for i, arg in enumerate(args):
        if isinstance(arg, Tensor):
            for d in range(1 if i in dynamic else 0, arg.dim()):
                torch._dynamo.mark_static(arg, d)


class CompiledKernels:
    """The process's TorchInductor-compiled CPU kernels and their state (one instance: :data:`COMPILED`).

    Attributes:
        failed: kernels whose compile failed in this process; they use the eager paths from then on.
        forked: True in a forked child process, where every kernel uses the eager paths.
    """

    def __init__(self) -> None:
        self._compiled: dict[Callable, Callable] = {}
        self.failed: set[Callable] = set()
        self.forked = False

    def applies(self, kernel: str, function: Callable, tensor: Tensor) -> bool:
        """Whether ``function`` runs compiled for the contrastive-kernel setting ``kernel`` (see the module
        docstring) on float32 working tensors like ``tensor``."""
        if kernel == "attention" or (kernel == "auto" and os.environ.get(ENVIRONMENT_OVERRIDE, "1") == "0"):
            return False
        return (not self.forked and function not in self.failed and tensor.is_cpu
                and tensor.dtype == torch.float32)

    def run(self, function: Callable, *args, dynamic: tuple[int, ...] = (0, 1, 2)):
        """``function(*args)`` compiled, or ``None`` if compiling failed (warned once per kernel).

        The first dimension of the arguments at positions ``dynamic`` (the anchors: their count changes every step)
        is dynamic; ``function`` calls :func:`static_shapes` with the same positions so that every other shape (the
        queue's) stays static, which keeps the hot loop free of index arithmetic (8.4 vs 1.0 ms per layer with
        every shape dynamic).
        """
        if function not in self._compiled:
            # Each layer shape (experts, queue size, width, top-k) and temperature is one more compiled version: a
            # process that builds many (a test suite, a notebook) would pass Dynamo's default limit of 8 and lose it.
            self._compiled[function] = torch.compile(function, fullgraph=True, recompile_limit=RECOMPILE_LIMIT)
        for i in dynamic:
            torch._dynamo.maybe_mark_dynamic(args[i], 0)
        try:
            return self._compiled[function](*args)
        except Exception as error:  # no C++ compiler, an unsupported platform...: the eager paths still work
            self.failed.add(function)
            warnings.warn(_failure_message(error), RuntimeWarning, stacklevel=3)
            return None


def _failure_message(error: Exception) -> str:
    if "RecompileLimit" in type(error).__name__:
        return (f"moelora_lit: this process compiled the contrastive loss's CPU kernel for more than "
                f"{RECOMPILE_LIMIT} layer shapes or temperatures; from now on it uses PyTorch's fused attention "
                "kernel (same values to 1e-5, slower). Raise moelora_lit.kernels.RECOMPILE_LIMIT before the first "
                "step to keep compiling.")
    return (f"moelora_lit: compiling the contrastive loss's CPU kernel failed ({type(error).__name__}: "
            f"{str(error).strip()[:300]}); using PyTorch's fused attention kernel instead (slower). Install a C++ "
            "compiler (g++), or set adapter.contrastive_kernel='attention' (or MOELORA_COMPILE_CONTRASTIVE=0) to "
            "silence this.")


COMPILED = CompiledKernels()


def _after_fork_in_child() -> None:
    # A forked child (Lightning's ddp_fork) inherits Inductor's compile workers and locks in an unusable state, where a
    # compile can hang. Children use the attention kernel (same values to 1e-5).
    COMPILED.forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
