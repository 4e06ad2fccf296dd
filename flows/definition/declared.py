"""A stage sees only the settings its row of the stage table declares.

:func:`declared_settings` returns a copy of the settings in which every field the stage's row does
not list is replaced by :class:`Undeclared`, a value that raises :class:`UndeclaredSettingError`
as soon as it is used (compared, converted, iterated, formatted, dumped). So the ``params`` of a
row, from which ``dvc.yaml`` and the stage's input fingerprint are made, cannot silently miss a
setting the stage reads: the stage fails on its first use of it, naming it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class UndeclaredSettingError(LookupError):
    """A stage used a setting that its row of ``flows/definition/stage_table.py`` does not list."""


class Undeclared:
    """Stands for a setting a stage did not declare; any use of it raises."""

    __slots__ = ("_stage", "_name")

    def __init__(self, stage: str, name: str) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_name", name)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise UndeclaredSettingError(
            f"stage {self._stage!r} read the setting {self._name!r}, which its row of flows/definition/stage_table.py does not "
            f"list in params: add it there (then regenerate dvc.yaml: python -m flows.cli dvc-yaml)"
        )

    def __repr__(self) -> str:
        return f"<setting {self._name} not declared by stage {self._stage}>"

    def __getattr__(self, name: str) -> Any:
        return self._fail()


for _dunder in (
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__hash__", "__len__", "__iter__",
    "__contains__", "__getitem__", "__int__", "__float__", "__index__", "__str__", "__format__", "__add__",
    "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
    "__abs__", "__round__", "__call__", "__setattr__", "__reduce__", "__reduce_ex__",
):
    setattr(Undeclared, _dunder, Undeclared._fail)


def _restricted(model: BaseModel, stage: str, prefix: str, declared: set[str]) -> BaseModel:
    values = {}
    for name, field in type(model).model_fields.items():
        dotted = f"{prefix}{name}"
        value = getattr(model, name)
        if dotted in declared:
            values[name] = value
        elif isinstance(value, BaseModel):
            values[name] = _restricted(value, stage, dotted + ".", declared)
        else:
            values[name] = Undeclared(stage, dotted)
    return type(model).model_construct(**values)


def declared_settings(settings: BaseModel, stage: str, params: tuple[str, ...]) -> BaseModel:
    """``settings`` with every field outside ``params`` replaced by :class:`Undeclared`.

    Args:
        settings: the run's :class:`~flows.definition.settings.PipelineSettings`.
        stage: the stage's name (for the error message).
        params: the row's ``params``: whole sections (``"finetune"``) or fields (``"attribution.solver"``).

    Returns:
        A settings object of the same class, built without validation.
    """
    return _restricted(settings, stage, "", set(params))


__all__ = ["Undeclared", "UndeclaredSettingError", "declared_settings"]
