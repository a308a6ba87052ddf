"""bfloat16 for Zarr and torch: the registered data type and the zero-copy views.

Zarr 3.1 has no bfloat16 and does not load ``zarr.data_type`` entry points, so the type is
registered here, explicitly, under the name ``"bfloat16"`` (the name zarr-extensions and
tensorstore use, so stores written this way stay readable by other zarr v3 implementations).
NumPy gets the dtype from ``ml_dtypes``; torch gets the bits through an int16 view, because
``torch.from_numpy`` does not know ml_dtypes' bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Self, TypeGuard

import ml_dtypes
import numpy as np
import torch
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, DTypeJSON
from zarr.core.dtype.npy.float import BaseFloat

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat[type(BF16), ml_dtypes.bfloat16]):  # type: ignore[misc]
    """Zarr v3 ``bfloat16``: little-endian 16-bit brain float backed by ``ml_dtypes``.

    Only the v3 spelling exists: NumPy reports the dtype as the opaque ``'<V2'`` in v2 terms,
    which would read back as raw bytes, so v2 metadata is refused rather than silently wrong.
    """

    dtype_cls = type(BF16)
    _zarr_v3_name: ClassVar[Literal["bfloat16"]] = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 2

    def to_native_dtype(self) -> np.dtype:
        # The ml_dtypes dtype class cannot be instantiated bare (BaseFloat's way), and the
        # type has one byte order in practice: the host's, little-endian everywhere we run.
        return BF16

    @classmethod
    def _check_json_v2(cls, data: DTypeJSON) -> TypeGuard[None]:
        return False

    @classmethod
    def _from_json_v2(cls, data: DTypeJSON) -> Self:
        raise DataTypeValidationError("bfloat16 exists only in zarr format 3")


def register() -> None:
    """Make ``"bfloat16"`` known to zarr (idempotent; importing this package already does it)."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


def bf16_to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch bfloat16 tensor sharing memory with a NumPy bfloat16 array (no copy)."""
    if array.dtype != BF16:
        raise TypeError(f"expected a bfloat16 array, got {array.dtype}")
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)


def bf16_to_float32(array: np.ndarray) -> np.ndarray:
    """Exact bfloat16 -> float32 in plain NumPy: the bits, shifted into the high half.

    Single-threaded on purpose: the reader converts on a background thread while training runs
    its GEMMs, and a torch conversion there would start torch's own worker threads on the same
    cores (measured: ~10% off training speed on 2 cores).
    """
    if array.dtype != BF16:
        raise TypeError(f"expected a bfloat16 array, got {array.dtype}")
    return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def torch_to_bf16(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy bfloat16 array sharing memory with a contiguous torch bfloat16 CPU tensor."""
    if tensor.dtype != torch.bfloat16:
        raise TypeError(f"expected a bfloat16 tensor, got {tensor.dtype}")
    return tensor.contiguous().view(torch.int16).numpy().view(BF16)


register()
