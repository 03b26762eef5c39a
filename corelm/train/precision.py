"""The run-level precision policy: ``fp32 | tf32 | bf16-mixed | fp16-mixed | bf16-true``.

This is the only place that casts for policy reasons (docs/DESIGN.md "Precision"). The names are declared once,
in :data:`corelm.commands.args.TRAIN_POLICIES`, which every training command's ``--precision`` offers.

* ``fp32``: everything in float32.
* ``tf32``: float32 tensors, but float32 matmuls and convolutions on CUDA run on the Tensor Cores in
  TensorFloat-32 (10-bit mantissa inputs, fp32 accumulation; NVIDIA A100 whitepaper): the
  ``torch.backends.cuda.matmul.allow_tf32`` / ``cudnn.allow_tf32`` switches and
  ``torch.set_float32_matmul_precision("high")``, set for the run and restored after it. CPUs have no TF32
  matmuls: there it is fp32, and the run says so in one line.
* ``bf16-mixed``: float32 master weights and optimizer state; matmuls run under ``torch.autocast`` in
  bfloat16 (Micikevicius et al. 2018, "Mixed Precision Training"). bf16 has fp32's exponent range, so
  no loss scaling is needed.
* ``fp16-mixed``: as above in float16, whose small range needs dynamic loss scaling
  (``torch.amp.GradScaler``): the loss is multiplied before backward, gradients unscaled before
  clipping, and steps with inf/NaN gradients are skipped while the scale backs off.
* ``bf16-true``: parameters, gradients and optimizer state all in bfloat16 (half the memory; the
  update loses precision for small learning rates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from corelm.commands.args import TRAIN_POLICIES
from corelm.errors import CorelmError

POLICIES = TRAIN_POLICIES


@dataclass(frozen=True)
class Precision:
    """A resolved policy for one device.

    Attributes:
        policy: one of :data:`POLICIES`.
        device_type: ``"cpu"`` or ``"cuda"`` (what autocast needs).
    """

    policy: str
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise CorelmError(f"unknown precision {self.policy!r}; expected one of {', '.join(POLICIES)}")

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype the parameters are stored (and updated) in."""
        return torch.bfloat16 if self.policy == "bf16-true" else torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the matmuls run in (what the matmul peak should be measured in)."""
        return {"fp32": torch.float32, "tf32": torch.float32, "bf16-mixed": torch.bfloat16,
                "fp16-mixed": torch.float16, "bf16-true": torch.bfloat16}[self.policy]

    def note(self) -> str | None:
        """One line to print at the start of a run when the policy means less on this device than its name."""
        if self.policy == "tf32" and self.device_type != "cuda":
            return f"precision tf32: {self.device_type} has no TensorFloat-32 matmuls; this run is fp32"
        return None

    def set_matmul_mode(self) -> Callable[[], None]:
        """Switch CUDA's float32 matmuls to TF32 for ``tf32`` (nothing for the other policies or off CUDA).

        Returns:
            a function that restores the previous switches (call it when the run ends).
        """
        if self.policy != "tf32" or self.device_type != "cuda":
            return lambda: None
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
               torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")  # TF32 (or bf16x3) matmuls for fp32 tensors

        def restore() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
            torch.set_float32_matmul_precision(old[2])

        return restore

    def apply(self, model: nn.Module) -> nn.Module:
        """Cast the model's parameters to :attr:`param_dtype` (in place) and return it."""
        return model.to(self.param_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward + loss: autocast for the ``*-mixed`` policies, a no-op otherwise."""
        if self.policy in ("bf16-mixed", "fp16-mixed"):
            return torch.autocast(self.device_type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A dynamic loss scaler for ``fp16-mixed``; ``None`` for the others."""
        if self.policy == "fp16-mixed":
            return torch.amp.GradScaler(self.device_type)
        return None
