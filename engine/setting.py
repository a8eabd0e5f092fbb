"""A setting declared once: a dataclass field whose metadata carries its help, the group it is listed
in and, where the type alone cannot say it, how to read it from text. The command line generates its
flags from these fields (cli/options.py), as it generates the optimization flags from the knobs, and
the service reports its limits from them; nothing restates a field.

    queue_size: int = setting(16, "requests waiting beyond the running one", group="load and timeouts")

The flag is the field's name with dashes (`--queue-size`), after the class's FLAG_PREFIX (`lora-`);
`flag=` names another only where an older flag must keep working. No torch here: --help imports it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    help: str
    group: str
    flag: str | None = None  # default: --<prefix><field-name>
    parse: Callable[[str], Any] | None = None  # text -> value, for values the type cannot read (lists, ranges)
    env: str | None = None  # an environment variable that replaces the default
    metavar: str | None = None
    repeat: bool = False  # the flag may be given several times; the values are collected in order
    public: bool = False  # reported to clients (/health's limits)


def setting(default: Any, help: str, group: str, **options) -> Any:
    """A dataclass field with its declaration; `default` may be a callable for mutable defaults."""
    metadata = {"setting": Setting(help, group, **options)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DeclaredField:
    """A field of a settings class, as the command line reads it."""

    name: str
    kind: Any  # the field's type, Optional removed
    optional: bool  # None is a value (meaning: decided later, e.g. by the model)
    default: Any
    setting: Setting
    flag: str

    def env_default(self) -> Any:
        """The default, or the value of its environment variable (as text: argparse reads it with `type`)."""
        if self.setting.env and os.environ.get(self.setting.env):
            return os.environ[self.setting.env]
        return self.default


def declared_fields(cls) -> list[DeclaredField]:
    """The fields of `cls` that carry a Setting, in declaration order."""
    hints = typing.get_type_hints(cls)
    prefix = getattr(cls, "FLAG_PREFIX", "")
    found = []
    for field in dataclasses.fields(cls):
        declared = field.metadata.get("setting")
        if declared is None:
            continue
        kind, optional = hints[field.name], False
        arguments = typing.get_args(kind)
        if type(None) in arguments:  # X | None
            kind, optional = next(argument for argument in arguments if argument is not type(None)), True
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = declared.flag or "--" + prefix + field.name.replace("_", "-")
        found.append(DeclaredField(field.name, kind, optional, default, declared, flag))
    return found


def public_values(settings) -> dict:
    """The settings a client may read (/health's limits), by field name."""
    return {field.name: getattr(settings, field.name) for field in declared_fields(type(settings)) if field.setting.public}
