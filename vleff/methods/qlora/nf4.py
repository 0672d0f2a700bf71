"""The 4-bit NormalFloat (NF4) frozen linear layer of QLoRA, on ``torchao``'s ``NF4Tensor``.

Why ``torchao`` and not ``bitsandbytes``: ``torchao.quantization.to_nf4`` / ``linear_nf4`` are plain
PyTorch (a tensor subclass that dequantises block by block to the input's dtype), so the same code
runs on CPU and CUDA; ``bitsandbytes``' ``Linear4bit`` needs its CUDA kernels on most builds (the CPU
path of 0.50 falls back with warnings, and ``bitsandbytes`` is not a dependency of vleff).

Format (QLoRA, Dettmers et al. 2023): blocks of ``block_size`` (64) consecutive weights, each
scaled by its absolute maximum and rounded to the nearest of 16 NF4 levels (quantiles of N(0, 1)
normalised to [-1, 1], with an exact 0); *double quantisation*: the per-block absmax constants,
minus their mean, are quantised to 8 bits in blocks of ``scaler_block_size`` (256) with one
floating scale per such block. Storage: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

INSTALL_HINT = "QLoRA's 4-bit base needs torchao (pip install torchao, 0.18 or later; runs on CPU and CUDA)"


def torchao_nf4() -> Any:
    """The ``torchao`` NF4 module (``to_nf4``, ``linear_nf4``, ``NF4Tensor``); ``ImportError``
    saying what to install when it is missing."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as err:  # the backend cannot run here: say what to install, never fall back
        raise ImportError(f"{INSTALL_HINT}; importing it failed: {err}") from err
    return nf4_tensor


def check_quantizable(name: str, weight: torch.Tensor, block_size: int, scaler_block_size: int) -> None:
    """``ValueError`` naming the layer when its weight cannot be cut into whole NF4 blocks and whole
    double-quantisation blocks (``torchao`` asserts instead of explaining)."""
    if not weight.is_floating_point():
        raise ValueError(f"QLoRA: {name}.weight has dtype {weight.dtype}; a floating-point weight is required")
    numel = weight.numel()
    blocks, rest = divmod(numel, block_size)
    if rest or blocks % scaler_block_size:
        raise ValueError(
            f"QLoRA: {name}.weight has {numel} entries ({tuple(weight.shape)}), which is not a whole number of "
            f"block_size={block_size} blocks grouped by scaler_block_size={scaler_block_size} "
            f"({block_size * scaler_block_size} entries); choose a block_size and scaler_block_size whose product "
            "divides every target weight's size"
        )


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 with double-quantised scales.

    The parts of ``torchao``'s ``NF4Tensor`` are kept as plain buffers (``nf4_codes``: two 4-bit
    codes a byte; ``nf4_absmax_codes``: the 8-bit absmax codes; ``nf4_absmax_scales``: one float per
    ``scaler_block_size`` absmax constants; ``nf4_absmax_mean``); :meth:`nf4_weight` is an
    ``NF4Tensor`` view over them built on access (no copy) and ``weight`` the dequantised weight.
    Why not an ``NF4Tensor`` parameter: ``torchao`` 0.18's
    ``NF4Tensor`` deep-copies by re-quantising with its default scaler block (so it fails or changes
    the weight), and supports no ``==`` or arithmetic, so ``state_dict`` comparison, pickling and
    DDP's broadcast of module state would each need special cases; plain ``uint8`` / ``int8`` /
    float buffers need none.

    It stays an ``nn.Linear`` (``in_features``, ``out_features``, ``weight``, ``bias``) so ``peft``
    wraps it with its LoRA layer as any Linear; the forward dequantises the weight to the input's
    dtype (``linear_nf4``, whose backward gives the input gradient only). The bias is the very
    parameter of the layer it replaces (not quantised, as in QLoRA).
    """

    #: the NF4 buffers are rebuilt from the base model when QLoRA is applied: adapter-only
    #: checkpoints leave them out (:data:`vleff.side.peft_tuners.REBUILT_BASE_BUFFERS`)
    vleff_rebuilt_base_buffers = True

    def __init__(self, source: nn.Linear, block_size: int = 64, scaler_block_size: int = 256) -> None:
        nn.Module.__init__(self)
        nf4 = torchao_nf4()
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.block_size = block_size
        self.scaler_block_size = scaler_block_size
        quantised = nf4.to_nf4(source.weight.detach().contiguous(), block_size, scaler_block_size)
        self.register_buffer("nf4_codes", quantised.quantized_data)
        self.register_buffer("nf4_absmax_codes", quantised.quantized_scalers)
        self.register_buffer("nf4_absmax_scales", quantised.quantization_factor)
        self.register_buffer("nf4_absmax_mean", quantised.scaler_mean.reshape(()))
        self.register_buffer("nf4_levels", quantised.nf4, persistent=False)
        self.bias = source.bias

    def nf4_weight(self) -> Any:
        """The ``NF4Tensor`` over the buffers (no copy; dtype: the buffers' float dtype)."""
        nf4 = torchao_nf4()
        shape = torch.Size((self.out_features, self.in_features))
        meta = nf4.SubclassTensorArgs(
            shape, (self.in_features, 1), 0, self.nf4_levels.dtype, self.nf4_codes.device, False
        )
        return nf4.NF4Tensor(
            meta,
            self.block_size,
            shape.numel() // self.block_size,
            self.scaler_block_size,
            self.nf4_absmax_codes,
            self.nf4_absmax_scales,
            self.nf4_absmax_mean,
            self.nf4_codes,
            self.nf4_levels,
        )

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantised weight, computed on access (transient full-precision memory), for code
        that reads a Linear's weight (``peft``'s layer set-up, LST's side-network init). It is an
        inference tensor: writing into it raises instead of being silently lost (the base is frozen
        4-bit state; ``apply_qlora`` again to re-quantise new weights)."""
        with torch.inference_mode():
            return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torchao_nf4().linear_nf4(x, self.nf4_weight())
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the forward uses, in the buffers' float dtype."""
        return self.nf4_weight().get_original_weight()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nf4 block={self.block_size}, scaler_block={self.scaler_block_size}"
        )


def nf4_storage_bytes(layer: NF4Linear) -> int:
    """Bytes an :class:`NF4Linear`'s weight holds: packed 4-bit codes, 8-bit absmax codes, one
    float per scaler block, the absmax mean and the 16-entry level table."""
    return sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n.startswith("nf4_"))


__all__ = ["INSTALL_HINT", "NF4Linear", "check_quantizable", "nf4_storage_bytes", "torchao_nf4"]
