"""Next-token cross-entropy through the tied 50,257-way output layer, without the full logits.

On a CPU the output layer dominates training: logits for a batch of 32 x 256 tokens are 1.65 GB
in fp32, and writing, soft-maxing and back-propagating through them costs more than the whole
transformer body of a small model. :func:`chunked_lm_loss` computes the same mean loss over
slices of tokens, and computes each slice's gradient in the same pass while its logits are
still in memory, so the logits GEMM is done once rather than again in a recomputing backward.
Per slice the (chunk x vocab) buffers are touched four times: the logits GEMM writes them, one
fused softmax reads and writes them, and the two gradient GEMMs read them. The buffers are
reused across calls, because freshly allocated memory costs a page fault per 4 KiB here.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256
_TINY_PROB = 1e-30  # below this, log(p) of the target loses precision: recompute that row exactly
_workspace: dict[tuple, torch.Tensor] = {}


def _buffer(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    key = (name, cols, like.dtype, like.device)
    buf = _workspace.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _workspace[key] = torch.empty((rows, cols), dtype=like.dtype, device=like.device)
    return buf[:rows]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T, y_i) / n, with the gradients w.r.t. h and W computed in the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        need_grad: bool,
    ):
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight) if need_grad else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            y = targets[start : start + chunk, None]
            c = h.shape[0]
            logits = torch.mm(h, weight.T, out=_buffer("logits", c, vocab, hidden))
            probs = torch.ops.aten._softmax.out(
                logits, 1, False, out=_buffer("probs", c, vocab, hidden)
            )
            p_target = probs.gather(1, y).squeeze(1)
            nll = -p_target.log()
            tiny = p_target < _TINY_PROB
            if tiny.any():  # rare: a confidently wrong row; take it through logsumexp instead
                rows = tiny.nonzero().squeeze(1)
                exact = torch.logsumexp(logits[rows], dim=1) - logits[rows].gather(
                    1, y[rows]
                ).squeeze(1)
                nll = nll.index_put((rows,), exact)
            total += nll.sum(dtype=torch.float64)
            if need_grad:
                # d(sum CE)/d(logits) = softmax - onehot; the 1/n is applied to the small GEMM
                # outputs.
                probs.scatter_add_(
                    1, y, torch.full((c, 1), -1.0, dtype=probs.dtype, device=probs.device)
                )
                torch.mm(probs, weight, out=grad_hidden[start : start + chunk])
                grad_weight.addmm_(probs.T, h, alpha=1.0 / n)
        if need_grad:
            grad_hidden.div_(n)
            ctx.save_for_backward(grad_hidden, grad_weight)
        return (total / n).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out if ctx.needs_input_grad[0] else None
        gw = grad_weight * grad_out if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``.

    ``hidden`` is (..., d), the final-LayerNorm output already aligned with ``targets`` (...,);
    ``weight`` is the (vocab, d) output matrix (GPT-2 ties it to the token embedding).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden states but {y.shape[0]} targets")
    # Decided here, not from ctx.needs_input_grad: under no_grad (validation) skip the gradient
    # work.
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(h.contiguous(), weight, y, chunk, need_grad)


def model_loss(model, input_ids: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean next-token loss of a ``GPT2LMHeadModel`` on blocks ``input_ids`` (B, T).

    Each block gives T-1 targets.
    """
    hidden = model.transformer(input_ids=input_ids).last_hidden_state
    return chunked_lm_loss(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:], chunk)
