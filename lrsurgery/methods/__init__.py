"""Methods, registered by name. A method turns one frozen weight into a ModuleAdapter at `init`
and may hook into training (see `Method`). Adding a method is one file plus one line here."""

from __future__ import annotations

from lrsurgery.methods.base import Method, MethodError, get_method, method_names, register
from lrsurgery.methods.dual.method import Dual
from lrsurgery.methods.hooks import HookContext, TrainHooks
from lrsurgery.methods.lora import LoRA
from lrsurgery.methods.pissa import PiSSA
from lrsurgery.methods.srlora import SRLoRA
from lrsurgery.methods.tlora.method import TLoRA

register(LoRA)
register(PiSSA)
register(TLoRA)
register(Dual)
register(SRLoRA)

__all__ = ["HookContext", "Method", "MethodError", "TrainHooks", "get_method", "method_names", "register"]
