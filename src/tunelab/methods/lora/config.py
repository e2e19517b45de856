from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tunelab.schema import MethodSection, TargetModules


class LoraConfig(MethodSection):
    """LoRA: h = W x + (alpha / r) * B (A x)."""

    implementation: ClassVar[str] = "tunelab.methods.lora.method:LoraMethod"
    export_formats: ClassVar[tuple[str, ...]] = ("peft", "merged")
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"


class DyLoraConfig(MethodSection):
    """DyLoRA: one rank b per optimizer step from {r_min..r}; forward with A[:b], B[:, :b], scale alpha/b."""

    implementation: ClassVar[str] = "tunelab.methods.lora.dylora:DyLoraMethod"
    export_formats: ClassVar[tuple[str, ...]] = ("peft", "merged")
    name: Literal["dylora"] = "dylora"
    r: int = Field(64, gt=0)
    r_min: int = Field(1, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    rank_distribution: Literal["uniform", "geometric"] = "uniform"
    # geometric: P(b = r_min + j) ∝ (1 - p)^j, so low ranks are drawn more often.
    geometric_p: float = Field(0.15, gt=0, lt=1)
    # unfrozen: all of the first b rows/columns train (what QDyLoRA's "semi-sorted" §4 implies);
    # frozen: only row b of A and column b of B (the DyLoRA paper's default).
    update: Literal["unfrozen", "frozen"] = "unfrozen"

    def evaluable_ranks(self) -> list[int]:
        return list(range(1, self.r + 1))

    @model_validator(mode="after")
    def _rank_range(self) -> DyLoraConfig:
        if self.r_min > self.r:
            raise ValueError(f"r_min ({self.r_min}) must be <= r ({self.r}); lower r_min or raise r")
        return self
