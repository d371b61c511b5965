"""The peft type of memory tokens: a member added to the installed ``peft``'s ``PeftType``, and the names peft uses.

peft's ``register_peft_method`` requires ``name.upper()`` to be a member of ``PeftType`` already, and an outside
package cannot edit that enum's source; so we add the member the way ``enum`` itself builds members, once.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "MEMORY_TOKENS"
PREFIX = "memory_"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


MEMORY_TOKENS = _add_peft_type_member(PEFT_TYPE_NAME)
