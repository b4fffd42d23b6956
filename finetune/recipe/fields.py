"""The recipe schema's field at a key path (`stages[0].sft.seq_len`): for path resolution and error messages."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from finetune.recipe.schema import Recipe


def field_at(loc: tuple) -> FieldInfo | None:
    """The pydantic FieldInfo for a key path in a recipe, or None."""
    ann: Any = Recipe
    info = None
    for key in loc:
        ann = unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            info = ann.model_fields.get(key) if isinstance(key, str) else None
            if info is None:
                info = extra_field(ann) if isinstance(key, str) else None
            if info is None:
                return None
            ann = info.annotation
        elif typing.get_origin(ann) is list:
            ann, info = typing.get_args(ann)[0], None
        elif typing.get_origin(ann) is dict:
            ann, info = typing.get_args(ann)[1], None
        else:
            return None
    return info


def extra_field(model: type[BaseModel]):
    """For a model whose extra keys are typed (`__pydantic_extra__: dict[str, X]`, like `data`), a field of type X."""
    if model.model_config.get("extra") != "allow":
        return None
    try:
        extra = typing.get_type_hints(model).get("__pydantic_extra__")
    except (NameError, TypeError):
        return None
    args = typing.get_args(extra) if typing.get_origin(extra) is dict else ()
    return FieldInfo.from_annotation(args[1]) if len(args) == 2 else None


def model_at(loc: tuple) -> type[BaseModel] | None:
    if not loc:
        return Recipe
    info = field_at(loc)
    if info is None:
        # a list item or a dict value: take the element type of the parent
        parent = field_at(loc[:-1]) if len(loc) > 1 else None
        ann = unwrap(parent.annotation) if parent is not None else None
        if ann is not None and typing.get_origin(ann) in (list, dict):
            ann = unwrap(typing.get_args(ann)[-1])
            return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        return None
    ann = unwrap(info.annotation)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def unwrap(ann: Any) -> Any:
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann
