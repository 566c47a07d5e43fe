"""One registry per config group: every option is registered once, next to its code.

An option of a group is what ``<group>=<name>`` on the command line picks: its name (the YAML
``conf/<group>/<name>.yaml`` where it has preset values), its schema (a dataclass whose fields are
exactly its keys, typed by OmegaConf when Hydra composes and range-checked by ``__post_init__``),
what builds it, and the facts the rest of dpl may ask of it before anything is built (a dataset's
sizes, whether a method takes local steps). A registration is one decorator::

    @DATASETS.register("blobs", BlobsConfig, facts=DatasetFacts(train=2000, channels=3, classes=4))
    def blobs(cfg, root): ...

Everything else is derived from the registries: Hydra's ConfigStore entries
(:mod:`dpl.config.store`), the options the command line may name (:mod:`dpl.config.validate`), the
key tables of the documentation. A module outside dpl registers options the same way (docs:
extending). This module imports nothing heavy, so the registries (and the config) load without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    """One registered option of a group."""

    group: str
    name: str
    schema: Optional[type]  # the option's keys (None: an option that only sets other keys, an ablation)
    build: Any  # what the group's code calls to make it (a function or a class)
    facts: Any  # what may be asked of it before it is built (a group's own dataclass, or None)
    module: str  # where it was registered

    def facts_for(self, node: Any) -> Any:
        """The option's facts for its config node: facts that depend on its keys (a synthetic dataset's
        size) are registered as a function of the node."""
        return self.facts(node) if callable(self.facts) else self.facts


class Registry(Mapping[str, Option]):
    """The options of one config group, by name (see the module doc). ``registry[name]`` of a name that
    is not registered is a one-line KeyError naming the group and the allowed names."""

    def __init__(self, group: str, doc: str, key: Optional[str] = None, facts: Any = None) -> None:
        self.group, self.doc = group, doc
        self.default_facts = facts  # the facts of an option registered without its own
        self.key = key or group  # the config key that names an option (method.outer.name for the outer optimizers)
        self._options: dict[str, Option] = {}
        REGISTRIES[self.key] = self

    def register(self, name: str, schema: Optional[type] = None, facts: Any = None) -> Callable[[T], T]:
        """Decorator: register the decorated function or class as option ``name`` (see the module doc)."""

        def add(build: T) -> T:
            self.add(name, schema, build, facts, module=getattr(build, "__module__", "") or "")
            return build

        return add

    def add(self, name: str, schema: Optional[type], build: Any, facts: Any = None, module: str = "") -> Option:
        """Register ``build`` as option ``name`` (what :meth:`register` does). Registering a name again
        replaces it only from the same module (a reloaded module); from elsewhere it is an error."""
        old = self._options.get(name)
        if old is not None and old.module != module:
            raise ValueError(f"{self.key}={name!r} is registered twice: in {old.module} and in {module}")
        option = Option(self.group, name, schema, build, self.default_facts if facts is None else facts, module)
        self._options[name] = option
        return option

    def __getitem__(self, name: str) -> Option:
        if name not in self._options:
            raise KeyError(f"{self.key}={name!r} is unknown: allowed {', '.join(sorted(self._options))}")
        return self._options[name]

    def __setitem__(self, name: str, option: Option) -> None:
        """Put ``option`` in place of ``name``'s (a test's stand-in; registrations use :meth:`register`)."""
        self._options[name] = option

    def __delitem__(self, name: str) -> None:
        del self._options[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``registry[name].build(*args, **kwargs)``."""
        return self[name].build(*args, **kwargs)

    def facts(self, node: Any) -> Any:
        """The facts of the option a config node names (``cfg.dataset`` -> the dataset's)."""
        return self[node.name].facts_for(node)

    def __repr__(self) -> str:
        return f"Registry({self.key}: {', '.join(self._options)})"


# every registry by the key that names its options: the config groups, and method.outer.name
REGISTRIES: dict[str, Registry] = {}


def lookup(registry: Mapping[str, T], key: str, name: str) -> T:
    """``registry[name]`` of a plain dict, or a one-line KeyError naming ``key`` and the allowed names."""
    if name not in registry:
        raise KeyError(f"{key}={name!r} is unknown: allowed {', '.join(sorted(registry))}")
    return registry[name]
