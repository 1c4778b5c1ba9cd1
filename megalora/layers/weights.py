"""ΔW, merge and unmerge of a LoRA layer's local base weight shard.

The math is :mod:`megalora.lora_math`'s; what an adapter's variant changes
(DoRA's magnitude and norm) its variant object supplies.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from .. import lora_math


class LoraWeights:
    """Mixin of :class:`~megalora.layers.base.LoraLayer`: the adapters' weights against the base weight."""

    def _delta_oi(self, adapter: str) -> torch.Tensor:
        """The local ΔW = scale · B @ A in ``[out_local, in_local]`` layout.

        The local product already is this rank's shard of the full ΔW, for
        column (B sharded) and row (A sharded) layers alike: no communication.
        QALoRA's group expansion uses the full layer's group count, so it holds
        for a row-parallel shard too.
        """
        return lora_math.delta_weight(self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                      self.scaling[adapter], self.lora_variant[adapter].groups(self))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base weight's own layout (transposed for ``fan_in_fan_out``)."""
        return self._to_base_layout(self._delta_oi(adapter))

    def _to_base_layout(self, weight_oi: torch.Tensor) -> torch.Tensor:
        return weight_oi

    def _row_norm(self, weight_oi: torch.Tensor) -> torch.Tensor:
        """Per-output-row L2 norm of a ``[out_local, in_local]`` weight, over the full input."""
        return lora_math.row_norm(weight_oi, self._reduce_row_norm_sq)

    def _unmerged_weight_oi(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out (a copy if any are merged).

        DoRA's norm is defined on the base weight as forward sees it, so a
        second DoRA adapter merged on top of a first needs the original weight.
        """
        weight = self.base_weight_oi()
        if not self.merged_adapters:
            return weight
        weight = weight.detach().clone()
        for adapter in reversed(self.merged_adapters):
            weight = self._unmerge_math(weight, adapter)
        return weight

    def _unmerge_math(self, weight_oi: torch.Tensor, adapter: str) -> torch.Tensor:
        return self.lora_variant[adapter].unmerged_weight(self, adapter, weight_oi, self._merged_norms.get(adapter))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Add the adapters' ΔW to the local base weight shard.

        Args:
            safe_merge: Compute on a copy and refuse to write non-finite values.
            adapter_names: Adapters to merge; the active ones when ``None``.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        base = self.get_base_layer()
        for adapter in names:
            with torch.no_grad():
                new_weight, norm = self.lora_variant[adapter].merged_weight(self, adapter, self.base_weight_oi())
                new_bias = None
                if self.lora_bias[adapter]:
                    if getattr(base, "bias", None) is None:
                        raise RuntimeError(
                            f"cannot merge adapter {adapter!r}: lora_bias=True but the base layer has no bias"
                        )
                    new_bias = lora_math.merged_bias(base.bias, self.lora_B[adapter].bias, self.scaling[adapter])
                if safe_merge and not (
                    torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
                ):
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                    )
                self._set_base_weight_oi(new_weight)
                if new_bias is not None:
                    base.bias.data.copy_(new_bias)
            if norm is not None:
                self._merged_norms[adapter] = norm
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                self._set_base_weight_oi(self._unmerge_math(self.base_weight_oi(), adapter))
                self._merged_norms.pop(adapter, None)
                if self.lora_bias[adapter]:
                    base.bias.data -= self.lora_B[adapter].bias * self.scaling[adapter]
