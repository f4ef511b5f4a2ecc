"""The registry of editing methods: one name -> its config dataclass and its class.

    register_method("mymethod", MyConfig, MyMethod)                 # objects, or
    register_method("ft", "chatedit.editors:FTConfig", "chatedit.editors:FineTune")  # names,
                                                                     # imported when first used

Every entry point looks a method up here, by the `rule` of its editor config:
scripts/train.py (what to build and whether to meta-train it), scripts/evaluate.py and
scripts/bench.py (through `Editor.from_pretrained`), and `Editor.from_pretrained` itself.
A new method is a module with a config dataclass and an `EditMethod` subclass, plus one
`register_method` call (docs/extending.md); the built-in ones are registered at the
end of this file by "module:object" names, so importing the registry imports no method.

A config dataclass holds every option of its method, test-time ones included, each with a
default and a help line (`field(metadata={"help": ...})`); `method.config_from(mapping)`
builds it from a YAML section or keyword overrides, and names any key it does not know;
`method.saved_config(mapping)` from a checkpoint's saved config, where an option renamed
since (the class's `RENAMED`) is read under its new name, one added since takes the value
it had before (`BEFORE`) and one removed since is dropped (`REMOVED`). FT, MEMIT and
AlphaEdit read their config through `conform(config, TheirConfig)`, so a method registered
with a smaller config of its own for one of those classes gets every option it leaves out
at the class's default.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field


def resolve(obj):
    """`obj` itself, or the object a "module:object" string names (imported now)."""
    if isinstance(obj, str):
        module, name = obj.split(":")
        return getattr(importlib.import_module(module), name)
    return obj


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_ref: type | str   # the dataclass of the method's options, or "module:Class"
    cls_ref: type | str      # an EditMethod subclass, or "module:Class"
    meta_trained: bool       # needs a checkpoint meta-trained by scripts/train.py
    default_edit_ref: object = None  # model -> (module, layers) it edits by default, or
                                     # "module:function"; None: models.default_edit

    def default_edit(self, model) -> tuple[str, list[int]]:
        from .models import default_edit

        return resolve(self.default_edit_ref or default_edit)(model)

    @property
    def own_layers(self) -> bool:
        """The method edits its own layers by default, not the model config's."""
        return self.default_edit_ref is not None

    @property
    def config(self) -> type:
        return resolve(self.config_ref)

    @property
    def cls(self) -> type:
        """The method's class (an `EditMethod` subclass)."""
        return resolve(self.cls_ref)

    @property
    def test_time(self) -> set[str]:
        """The options a meta-trained editor of this method may change after training."""
        return {f.name for f in dataclasses.fields(self.config) if f.metadata.get("test_time")}

    def config_from(self, values: Mapping | None = None, **overrides):
        """The method's config from `values` (a mapping: YAML section, saved config) with
        `overrides` on top; an unknown key is an error naming the method's known ones."""
        renamed = getattr(self.config, "RENAMED", {})  # old names, e.g. in older checkpoints
        values = {renamed.get(k, k): v for k, v in {**dict(values or {}), **overrides}.items()}
        values.setdefault("rule", self.name)
        known = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for editing method {self.name!r}; "
                            f"it has {sorted(known - {'rule'})}")
        if values["rule"] != self.name:
            raise ValueError(f"a config of method {values['rule']!r} given to {self.name!r}")
        return self.config(**values)

    def saved_config(self, saved: Mapping, **overrides):
        """The config a checkpoint was trained with (`saved`: its editor section). Options
        since removed (`config.REMOVED`: option -> the values that behave as today's
        code, the first how it runs) are dropped, with a warning where the checkpoint was
        trained with another value; in a config that holds one of them (written before they
        were removed), options it lacks take the value they had before they existed
        (`config.BEFORE`)."""
        removed = getattr(self.config, "REMOVED", {})
        if set(saved) & set(removed):  # written before they were removed: BEFORE applies
            saved = {**getattr(self.config, "BEFORE", {}), **saved}
        for name, same in removed.items():
            if name in saved and (value := saved.pop(name)) not in same:
                warnings.warn(f"this {self.name} checkpoint was trained with {name}={value!r}, "
                              f"an option since removed; it runs as {name}={same[0]!r} "
                              "(retrain it for its best results)", stacklevel=3)
        return self.config_from(saved, **overrides)


METHODS: dict[str, MethodSpec] = {}


def option(default, help: str, test_time: bool = False):  # noqa: A002 (metadata's word)
    """A config field with its default and help line (a list or dict default is copied per
    instance); `test_time`: a meta-trained editor may change it after training."""
    meta = {"help": help, "test_time": test_time}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def register_method(name: str, config: type | str, cls: type | str,
                    meta_trained: bool = False, default_edit=None) -> MethodSpec:
    """Add an editing method. `config`: a dataclass with a `rule` field (the method's name)
    and one field per option; `cls`: an `EditMethod` subclass with `from_config`;
    `default_edit`: model -> (module, layers) the method edits unless told (default: the
    toolkit's, `models.default_edit`). Each may be a "module:object" string, imported when
    the method is first used."""
    if name in METHODS:
        raise ValueError(f"editing method {name!r} is already registered")
    for obj in (config, cls):
        if not isinstance(obj, type | str):
            raise TypeError(f"method {name!r}: config and cls are classes or "
                            f"'module:object' strings, got {obj!r}")
    if isinstance(config, type) and "rule" not in {f.name for f in dataclasses.fields(config)}:
        raise TypeError(f"the config of method {name!r} must be a dataclass with a 'rule' field")
    METHODS[name] = MethodSpec(name, config, cls, meta_trained, default_edit)
    return METHODS[name]


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown editing method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def conform(config, cls: type):
    """`config` read as `cls`, the config dataclass an editor class reads: the fields they
    share from `config`, every other field at `cls`'s default. A method registered with a
    config of its own for an existing editor class (FT with steps and lr only, say) gets the
    options it does not name, including ones the editor gained later, at their defaults."""
    if isinstance(config, cls):
        return config
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
                  if hasattr(config, f.name)})


def help_lines(config: type) -> dict[str, str]:
    """{field: its help line} of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config)}


register_method("none", "chatedit.editors:NoConfig", "chatedit.editors:Unedited")
register_method("ft", "chatedit.editors:FTConfig", "chatedit.editors:FineTune")
register_method("malmen", "chatedit.editors:MalmenConfig", "chatedit.editors:HyperMethod",
                meta_trained=True)
register_method("mend", "chatedit.editors:MendConfig", "chatedit.editors:HyperMethod",
                meta_trained=True)
register_method("memit", "chatedit.memit:MemitConfig", "chatedit.memit:Memit",
                default_edit="chatedit.memit:locate_edit")
register_method("alphaedit", "chatedit.memit:AlphaEditConfig", "chatedit.memit:AlphaEdit",
                default_edit="chatedit.memit:locate_edit")
