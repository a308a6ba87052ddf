import pytest
import torch
import torch.nn.functional as F

from unsuperpose.lm import chunked_lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 25, 8, generator=gen, requires_grad=True)
    weight = torch.randn(300, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (2, 25), generator=gen)

    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 300), targets.reshape(-1))
    gh, gw = torch.autograd.grad(3.0 * ref, (hidden, weight))
    ours = chunked_lm_loss(hidden, weight, targets, chunk)
    oh, ow = torch.autograd.grad(3.0 * ours, (hidden, weight))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(oh, gh, atol=1e-6) and torch.allclose(ow, gw, atol=1e-6)


def test_confidently_wrong_rows_stay_finite_and_exact():
    hidden = torch.tensor([[60.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([1, 2])  # row 0: the target's probability is ~e^-240, below fp32
    ours = chunked_lm_loss(hidden, weight, targets)
    assert torch.isfinite(ours) and torch.allclose(
        ours, F.cross_entropy(hidden @ weight.T, targets)
    )


def test_no_grad_path_gives_the_same_value():
    hidden, weight = torch.randn(10, 4), torch.randn(50, 4)
    targets = torch.randint(0, 50, (10,))
    with torch.no_grad():
        value = chunked_lm_loss(hidden, weight, targets, 3)
    assert torch.allclose(value, F.cross_entropy(hidden @ weight.T, targets), atol=1e-6)
