"""Cross-entropy fused with the output projection, computed in chunks of rows.

The full [tokens, vocabulary] logits never exist: each chunk's logits are made, turned into the
loss and, when gradients are needed, straight into the gradients of the hidden states and of the
output weight (as Liger-Kernel's fused linear cross-entropy does). Backward then only scales the
stored gradients, so no matmul is recomputed. This saves the largest activation of a small model
and makes the softmax passes over a chunk rather than the whole logits.

The optional z-loss (PaLM, OLMo 2) adds `z * log(Z)^2` per token, Z the softmax normaliser; its
gradient with respect to the logits is `2 z log(Z) softmax`, folded into the same pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx

IGNORE_INDEX = -100


def _chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 16 MiB of float32 logits on CPU, 1 GiB on a GPU. Larger chunks make larger, more
    efficient matmuls; on a 2-core EPYC 16 MiB (1024 rows of a 4096 vocabulary) measured 12 % faster than
    4 MiB and than unchunked logits. On a GPU a few large matmuls keep its tensor cores busy."""
    budget = (1 << 28) if device.type == "cuda" else (1 << 22)
    return max(1, min(n_rows, budget // max(vocab, 1)))


def _chunk(
    logits: torch.Tensor, t: torch.Tensor, z_loss: float, needs_grad: bool, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed cross-entropy, summed z-loss, gradient of their sum w.r.t. the logits) for one chunk of rows."""
    logits = logits.float()
    valid = t != IGNORE_INDEX
    safe_t = t.clamp(min=0)
    picked = logits.gather(1, safe_t[:, None]).squeeze(1)
    peak = logits.amax(dim=-1, keepdim=True)
    exp_sum = logits.sub_(peak).exp_().sum(dim=-1)  # in place: no second logits-sized buffer
    lse = peak.squeeze(1) + exp_sum.log()
    ce = ((lse - picked) * valid).sum()
    z = (lse.square() * valid).sum() * z_loss if z_loss else torch.zeros_like(ce)
    if not needs_grad:
        return ce, z, None
    scale = (1.0 + 2.0 * z_loss * lse) / exp_sum if z_loss else exp_sum.reciprocal()
    probs = logits.mul_(scale[:, None])
    probs[torch.arange(len(t), device=t.device), safe_t] -= 1.0
    probs *= valid[:, None]
    return ce, z, probs.to(grad_dtype)


@functools.cache
def _compiled_chunk() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The chunk's elementwise work fused by torch.compile (a few kernels instead of a dozen passes)."""
    return torch.compile(_chunk, dynamic=False)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        needs_grad: bool,
        z_loss: float,
        compiled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        step = _chunk_rows(n, vocab, hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        autocast = torch.is_autocast_enabled(hidden.device.type)
        grad_dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
        chunk = _compiled_chunk() if compiled else _chunk
        for start in range(0, n, step):
            h = hidden[start : start + step]
            ce, z, grad_logits = chunk(h @ weight.T, targets[start : start + step], z_loss, needs_grad, grad_dtype)
            total += ce
            z_total += z
            if needs_grad:
                grad_hidden[start : start + step] = grad_logits @ weight
                if autocast:  # the matmul in bf16 as autocast runs the forward's, accumulated in float32
                    grad_weight += grad_logits.T @ h
                else:
                    grad_weight.addmm_(grad_logits.T.float(), h.float())
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(z_total)
        return total + z_total, z_total

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_output: torch.Tensor, _grad_z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


def fused_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of cross-entropy + z_loss * log(Z)^2, the z part alone, not differentiable).

    hidden: [N, d], weight: [V, d], targets: [N] (-100 rows skipped). Both are float32 scalars.
    `compiled` runs each chunk's softmax and gradient through torch.compile.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, needs_grad, float(z_loss), compiled)
