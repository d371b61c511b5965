"""Every change this package makes to peft, in one place: what peft offers an outside tuner no hook for. Each part says
which peft hook would replace it if the tuner went upstream as ``src/peft/tuners/memory_tokens/``.

1. ``MEMORY_TOKENS``: a member added to peft's ``PeftType`` enum (upstream: one line in ``peft/utils/peft_types.py``).
2. ``install_forward``: a bound method on the base model instance that routes its forward to the tuner (upstream:
   ``PeftModel.forward`` calling the tuner's ``forward``, as prompt-learning methods are special-cased today).
"""

from __future__ import annotations

import inspect
import types
import weakref

from peft.utils import PeftType
from torch import nn

from .errors import InputError

PREFIX = "memory_"


# --- 1. the PeftType member ------------------------------------------------------------------------------------------
PEFT_TYPE_NAME = "MEMORY_TOKENS"


def _add_peft_type_member(name: str) -> PeftType:
    """peft's ``register_peft_method`` needs ``name`` to be a ``PeftType`` member already, and an outside package cannot
    edit that enum's source: add the member the way ``enum`` builds members, once (upstream: one line in peft)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


MEMORY_TOKENS = _add_peft_type_member(PEFT_TYPE_NAME)


# --- 2. the base model's forward, routed to the tuner --------------------------------------------------------------
class _TunerRoute(nn.Module):
    """Where a base model's forward goes: its tuner, by weak reference (no model <-> tuner cycle). An ``nn.Module``,
    never registered as a submodule (it lives in a bound method), because torch.compile guards a module by what the
    code reads from it and other objects by identity: an identity-guarded forward made every new PeftModel of the
    same layout compile again, and with ``fullgraph=True`` the ninth in one process failed (dynamo's recompile
    limit)."""

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.tuner = weakref.ref(tuner)

    def __deepcopy__(self, memo):  # a deep copy of the model inside a copy of the tuner routes to the copied tuner
        tuner = self.tuner()
        return _TunerRoute(memo.get(id(tuner), tuner))


def _routed_forward(route: _TunerRoute, *args, **kwargs):
    """The base model's forward, routed through the tuner (bound to a ``_TunerRoute``)."""
    tuner = route.tuner()
    if tuner is None:
        raise InputError(
            "This model's memory adapters belonged to a PeftModel that no longer exists: wrap the "
            "model again (get_peft_model / PeftModel.from_pretrained), or call unload() on the "
            "PeftModel before dropping it to keep the plain model."
        )
    return tuner.memory_forward(*args, **kwargs)


def install_forward(model: nn.Module, tuner: nn.Module) -> None:
    """peft's PeftModel calls the base model's ``forward`` directly: route it to the tuner (removed on ``unload``).
    A model wrapped again (e.g. after its first PeftModel was dropped) runs through the newest tuner."""
    installed = model.__dict__.get("forward")
    route = getattr(installed, "__self__", None)
    if not isinstance(route, _TunerRoute) or route.tuner() is not tuner:
        # transformers.Trainer keeps only the dataset columns named in forward's signature: show it the tuner's (a
        # bound method's signature drops the first parameter, here memory_forward's self)
        _routed_forward.__signature__ = inspect.signature(type(tuner).memory_forward)
        model.__dict__["forward"] = types.MethodType(_routed_forward, _TunerRoute(tuner))


def remove_forward(model: nn.Module) -> None:
    model.__dict__.pop("forward", None)
