"""The pydantic building blocks every config section shares: the run config's sections (config.py)
and each method's own config (methods/<name>/config.py)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

from tunelab.errors import TunelabError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _split_names(value: Any) -> Any:
    """`q_proj,v_proj` (as typed on the command line) is the list [q_proj, v_proj]."""
    if isinstance(value, str) and value != "all-linear":
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


TargetModules = Annotated[Literal["all-linear"] | list[str], BeforeValidator(_split_names)]


class MethodSection(Section):
    """A method's config, and what the method declares it can do (checked where configs are
    validated, so the engine and the CLI never ask for a method by name)."""

    implementation: ClassVar[str]  # "module:Class" of its `methods.base.Method`, imported when built
    # True: the base model's own weights train (so they cannot be 4-bit, and stay fp32 under bf16)
    trains_base_weights: ClassVar[bool] = False
    # what `tunelab export --format` writes for it ('merged' also gives 'gguf')
    export_formats: ClassVar[tuple[str, ...]] = ("merged",)

    def evaluable_ranks(self) -> list[int]:
        """The ranks one trained adapter can be evaluated at (DyLoRA: every rank); [] for none."""
        return []

    def check_rank(self, rank: int | None) -> None:
        """Refuse a --rank this method's run cannot compute at (before its model loads)."""
        evaluable = self.evaluable_ranks()
        if rank is not None and rank not in evaluable:
            raise TunelabError(
                f"--rank {rank}: this run trained ranks {evaluable[0]}..{evaluable[-1]}"
                if evaluable
                else f"--rank {rank}: this run's method trains one rank; drop --rank"
            )
