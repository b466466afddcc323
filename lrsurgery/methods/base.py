"""What a method is: a config, a per-module initialiser and optional training hooks."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from lrsurgery.config import option
from lrsurgery.errors import UserError, check_count, check_number
from lrsurgery.layers.spec import ModuleAdapter
from lrsurgery.linalg.basics import all_finite
from lrsurgery.methods.hooks import TrainHooks

MAX_ALPHA = 1e6
DEFAULT_RANK = 8


class MethodError(UserError, ValueError):
    """A method was given options or weights it cannot work with."""


@dataclass
class Method:
    """Base class for a method's config. Subclasses are dataclasses registered by `name`."""

    name: ClassVar[str] = ""
    rank: int | None = option(None, "Adapter rank per module (default 8).", short="-r")
    alpha: float | None = option(None, "LoRA alpha: the scale is alpha/rank (default: alpha = rank).")
    dropout: float | None = option(None, "Dropout on the adapter's input during training (default 0).")

    def __post_init__(self) -> None:
        """Check every option's range and fill in the defaults that depend on others (the resolved
        configuration is what the init manifest records)."""
        self.rank = DEFAULT_RANK if self.rank is None else self.rank
        self.dropout = 0.0 if self.dropout is None else self.dropout
        check_count("--rank", self.rank, error=MethodError)
        # the scale α/r must be > 0; beyond 1e6 it only overflows fp32 adapters and activations
        check_number("--alpha", self.alpha, 0, MAX_ALPHA, low_open=True, error=MethodError)
        check_number("--dropout", self.dropout, 0, 1, high_open=True, error=MethodError)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)

    @property
    def alpha_value(self) -> float:
        return float(self.alpha)

    def options(self) -> dict[str, Any]:
        """Every option's value as used (defaults resolved), JSON-able: what the init manifest records."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check_shape(self, name: str, weight: torch.Tensor, rank: int, what: str = "rank") -> None:
        """MethodError unless `rank` (the option called `what` in the message) fits module `name`'s weight
        and the weight is finite."""
        limit = min(weight.shape)
        if rank > limit:
            raise MethodError(
                f"{what} {rank} is larger than module {name} allows: its weight is "
                f"{weight.shape[0]}x{weight.shape[1]}, so {what.removesuffix(' =')} can be at most {limit}"
            )
        if not all_finite(weight):
            raise MethodError(f"module {name} has NaN or Inf weights")

    # True: `init_modules` receives modules grouped by weight shape (so it can batch), else in model order
    batch_by_shape: ClassVar[bool] = False

    def prepare(self, shapes: dict[str, tuple[int, int]], model: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """Called once before any module is initialised with every target's (d_out, d_in) and the
        model's manifest record (source, fingerprint: to check statistics against); returns what the
        init manifest should record about the method's choices (its key `stats_fingerprint`, naming the
        calibration a data-driven init read, goes into the manifest's config and the model card)."""
        return {}

    def init_modules(self, weights: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, ModuleAdapter]:
        """Adapters for several modules from their (d_out, d_in) fp32 weights; a module may be left out."""
        return {name: self.init_module(name, weight, generator) for name, weight in weights.items()}

    def init_module(self, name: str, weight: torch.Tensor, generator: torch.Generator) -> ModuleAdapter:
        """Build the adapter for one module from its (d_out, d_in) fp32 weight."""
        raise NotImplementedError

    def hooks(self) -> TrainHooks:
        return TrainHooks()

    @classmethod
    def budget_options(cls, rank: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """The init options that give this method about the trainable parameters of a LoRA of rank `rank`
        on the modules of `shapes` (name → (d_out, d_in)): Σ rank·(d_in + d_out). Default: the same rank."""
        return {"rank": rank}


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def registered() -> dict[str, type[Method]]:
    """The registered method classes by name, in registration order."""
    return dict(_REGISTRY)


def get_method(name: str, **options: Any) -> Method:
    """Instantiate the registered method `name` with `options` (unknown options are an error)."""
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    cls = _REGISTRY[name]
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(k for k in options if k not in fields)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise MethodError(f"method {name!r} does not take {flags}")
    return cls(**options)
