from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tunelab.schema import MethodSection, TargetModules


class SpielConfig(MethodSection):
    """SpIEL sparse fine-tuning: per weight matrix k (index, delta) pairs; update -> prune -> regrow."""

    implementation: ClassVar[str] = "tunelab.methods.spiel.method:SpielMethod"
    export_formats: ClassVar[tuple[str, ...]] = ("spiel", "merged")
    name: Literal["spiel"] = "spiel"
    # budget: a fraction of all model parameters, or an absolute count (num_tunable wins when set)
    density: float | None = Field(0.01, gt=0, le=1)
    num_tunable: int | None = Field(None, gt=0)
    target_modules: TargetModules = "all-linear"
    regrowth: Literal["ag", "ma"] = "ag"  # accumulated gradients (AdamW) | momentum approx. (SM3)
    reselection_steps: int = Field(20, gt=0)
    accumulation_steps: int = Field(5, gt=0)
    initial_reselection_rate: float = Field(0.2, ge=0, le=1)
    reselection_policy: Literal["linear", "cosine"] = "linear"
    sm3_beta: float = Field(0.0, ge=0, lt=1)  # SM3 momentum; 0 (none) as the reference, which drops it
    # SpIEL-AG's AdamW epsilon, added to sqrt(v) before bias correction: 1e-6 as the reference (its
    # scripts keep SftAdamW's default). It matters: per-weight gradients of a 7B model are 1e-5..1e-4.
    adam_epsilon: float = Field(1e-6, gt=0)
    # SpIEL-MA's SM3 epsilon, under the square root, update = g / sqrt(nu + eps): 1e-8 as the
    # reference. Separate from adam_epsilon because it enters differently (1e-8 under the root is
    # about 1e-4 next to sqrt(nu)).
    sm3_eps: float = Field(1e-8, gt=0)

    @model_validator(mode="after")
    def _schedule(self) -> SpielConfig:
        if self.accumulation_steps >= self.reselection_steps:
            raise ValueError(
                f"accumulation_steps ({self.accumulation_steps}) must be < reselection_steps "
                f"({self.reselection_steps})"
            )
        if self.density is None and self.num_tunable is None:
            raise ValueError("set density (fraction of all parameters) or num_tunable")
        return self
