"""Fill the gaps between PyPI gguf-py and the llama.cpp we match (llama-cpp-python 0.3.36's vendored tree).

gguf 0.19.0, the newest release, stops at ggml type 41 (Q1_0): it has no ``GGMLQuantizationType.Q2_0`` (42),
no ``GGML_QUANT_SIZES`` entry for it and no ``LlamaFileType.MOSTLY_Q2_0`` (41), although the vendored gguf-py
(gguf-py/gguf/constants.py) and ggml.h define them. Without the enum value ``GGUFReader`` fails on any file
that holds a Q2_0 tensor and nothing can name the type (shared/reference/gguf-lowbit.md §7).

``qconvert/__init__.py`` imports this module, so the missing members exist as soon as any qconvert module is
imported. Members that the installed gguf-py already has are left alone, so a newer gguf-py wins.
"""

from __future__ import annotations

from enum import IntEnum

import gguf

# (enum, name, value) from the vendored gguf-py/gguf/constants.py
_MEMBERS: tuple[tuple[type[IntEnum], str, int], ...] = (
    (gguf.GGMLQuantizationType, "Q2_0", 42),
    (gguf.LlamaFileType, "MOSTLY_Q2_0", 41),
)
# type -> (elements per block, bytes per block), as GGML_QUANT_SIZES / ggml_type_traits (block_q2_0)
_SIZES: dict[str, tuple[int, int]] = {"Q2_0": (64, 2 + 16)}


def _add_member(cls: type[IntEnum], name: str, value: int) -> None:
    """Add ``name = value`` to an existing IntEnum the way EnumType builds members, so that lookup by value,
    by name, as an attribute, iteration and pickling all work."""
    if name in cls.__members__ or value in cls._value2member_map_:
        return
    member = int.__new__(cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = cls
    member.__init__(value)
    if hasattr(cls, "_add_member_"):  # Python >= 3.13
        cls._add_member_(name, member)
    else:
        if hasattr(member, "_sort_order_"):
            member._sort_order_ = len(cls._member_names_)
        cls._member_names_.append(name)
        cls._member_map_[name] = member
        type.__setattr__(cls, name, member)
    cls._value2member_map_[value] = member


def install() -> None:
    for cls, name, value in _MEMBERS:
        _add_member(cls, name, value)
    for name, size in _SIZES.items():
        gguf.GGML_QUANT_SIZES.setdefault(gguf.GGMLQuantizationType[name], size)


install()
