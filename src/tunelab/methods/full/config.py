from __future__ import annotations

from typing import ClassVar, Literal

from tunelab.schema import MethodSection


class FullConfig(MethodSection):
    """Full fine-tuning: every weight trains."""

    implementation: ClassVar[str] = "tunelab.methods.full.method:FullMethod"
    trains_base_weights: ClassVar[bool] = True
    name: Literal["full"] = "full"
