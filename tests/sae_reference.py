"""A lone SAE trained the plain way (autograd + torch.optim.Adam): the yardstick for the grid."""

import torch

from unsuperpose.train import SAE
from unsuperpose.train.init import init_params
from unsuperpose.train.trainer import data_sample


def train_alone(src, cfg, l1: float, n: int) -> SAE:
    """Same init seed and the same batches as the grid trainer would use for (l1, n)."""
    data = data_sample(src, max(cfg.dict_sizes), cfg.seed) if cfg.decoder_init == "data" else None
    params = init_params(
        src.d,
        n,
        seed=cfg.seed,
        decoder_init=cfg.decoder_init,
        encoder_init=cfg.encoder_init,
        tied=cfg.tied,
        data=data,
    )
    sae = SAE(src.d, n, tied=cfg.tied, params=params)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    it = src.batches(cfg.batch_size, seed=cfg.data_seed)
    for _ in range(cfg.steps):
        opt.zero_grad()
        sae.loss(next(it), l1, cfg.l1_norm).backward()
        opt.step()
        sae.renormalise_()
    if hasattr(it, "close"):
        it.close()
    return sae


def assert_matches(grid_params: dict, alone: SAE) -> None:
    torch.testing.assert_close(
        grid_params["W_dec"], alone.dictionary().detach(), atol=2e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        grid_params["W_enc"], alone.encoder_weight().detach(), atol=2e-5, rtol=1e-4
    )
    torch.testing.assert_close(grid_params["b_enc"], alone.b_enc.detach(), atol=2e-5, rtol=1e-4)
