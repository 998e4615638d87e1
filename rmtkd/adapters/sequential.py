"""Plain networks: MLP chains (``nn.Linear -> [activation / Dropout]* -> nn.Linear`` inside
``nn.Sequential`` containers or a block holding them as attributes) and ResNet-style CNNs
(``nn.Conv2d -> [BatchNorm2d] -> [activation]* -> nn.Conv2d``).

Their coupled dimension is the width between a producer and its consumer, found from the
execution chain around the consumer (:func:`rmtkd.reduce.maths.execution_chain`); the
sites are the hidden Linear / Conv2d inputs (:func:`rmtkd.capture.find_sites`).
"""
from __future__ import annotations

from torch import nn


class SequentialAdapter:
    name = "sequential"
    hf_classes: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())

    def describe(self) -> str:
        return ("Linear / Conv2d producer -> consumer chains (MLPs in nn.Sequential or "
                "attribute blocks, ResNet basic and bottleneck blocks)")
