"""The component protocol of the UniSD self-distillation recipe.

A *component* is one idea of the method (a teacher, a weighting, an extra loss)
packaged as a small class with four hooks, registered under the name that the
config key, the ``run.json`` ``components`` column and the leaderboard all use::

    from unisd.components.base import Component, register_component

    @register_component("my_idea")
    class MyIdea(Component):
        needs = frozenset()                    # what the recipe must compute for it
        @dataclasses.dataclass(frozen=True)
        class Params:                          # its config block, validated like every config
            weight: float = 0.1
        def loss_terms(self, ctx, targets):
            return {self.name: self.params.weight * ctx.seq_mean(...)}

The recipe (:mod:`unisd.train`) calls the hooks in config order, no event bus:

* ``setup(ctx)``                      once, before training (and before a resume loads state)
* ``teacher_targets(ctx) -> Targets`` only on the ONE component with ``provides_teacher = True``
* ``loss_terms(ctx, targets) -> {name: scalar}``  every micro-batch, after the student forward.
  ``ctx.per_token`` holds the per-token divergence l_t [B, L] (after the vocabulary sum);
  a hook may replace it (clipping), multiply ``ctx.token_weights`` (agreement), and/or
  return extra scalar terms, which the recipe adds to the loss and logs one by one.
  The distillation term ``kd = ctx.seq_mean(ctx.per_token, ctx.token_weights)`` is reduced
  by the recipe AFTER every hook ran, so transforms of l_t always happen before weighting.
* ``on_step_end(ctx)``                after each optimiser step (EMA update)

``needs`` (a subset of :data:`NEEDS`) says what a component requires, so nothing is
computed that no component uses: without ``hidden_states`` the forwards return no hidden
states; without ``teacher_model`` no frozen copy of the model is made.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, ClassVar

from scd.core.config import ConfigError, Source, from_dict
from scd.core.registry import did_you_mean, registry

COMPONENTS = registry("component")

NEEDS = {
    "teacher_model": "a frozen copy of the model at the start of training (ctx.teacher)",
    "completions": "completions sampled from the student (ctx.batch)",
    "hidden_states": "student and teacher hidden states at the completion positions",
    "extra_teacher_passes": "additional teacher forward passes run by the component itself",
}


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A component without parameters."""


class Component:
    """Base class: every hook is a no-op; override what the component does."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset] = frozenset()
    provides_teacher: ClassVar[bool] = False
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx) -> None:
        """Once before training (build indices, projections, teacher state)."""

    def teacher_targets(self, ctx) -> "Targets":  # pragma: no cover - only providers implement it
        raise NotImplementedError(f"component '{self.name}' does not provide teacher targets")

    def loss_terms(self, ctx, targets: "Targets") -> dict:
        """Extra loss terms {name: scalar tensor} (added to the loss as they are)."""
        return {}

    def on_step_end(self, ctx) -> None:
        """After each optimiser step (``ctx.step`` = number of steps done)."""

    # ------------------------------------------------------------------ state
    def trainable_modules(self) -> dict:
        """{name: torch.nn.Module} trained with the model (e.g. a projection)."""
        return {}

    def state_dict(self) -> dict:
        """Non-trainable state needed to resume (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"component '{self.name}' got state {sorted(state)} but keeps none")

    def describe(self) -> dict:
        """Parameters for run.json hparams."""
        return dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else {}


@dataclasses.dataclass
class Targets:
    """What the teacher provider returns for one micro-batch.

    logits         [B, L, V] teacher logits at the completion positions (no gradient)
    temperature    the loss temperature: both logits are divided by it in the divergence
    hidden_states  per layer [B, L, H] (only when some component needs ``hidden_states``)
    """

    logits: Any
    temperature: float = 1.0
    hidden_states: tuple | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def register_component(name: str, *, override: bool = False):
    """Class decorator: register a :class:`Component` subclass under ``name``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Component)):
            raise TypeError(f"@register_component('{name}') expects a Component subclass, got {cls!r}")
        unknown = set(cls.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"component '{name}' declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"component '{name}': Params must be a dataclass")
        cls.name = name
        return COMPONENTS.register(name, override=override)(cls)

    return deco


# ------------------------------------------------------------------------- changed defaults
def added_param(*, default: Any, legacy: Any) -> Any:
    """A component parameter whose default changed (or that was added) after runs were recorded.

    ``legacy`` is how every run recorded before behaved.  The resolved config writes the
    parameter out whenever the component is on (:func:`explicit_spec`), so a config.yaml
    always says which behaviour it ran; the run id leaves it out when it holds ``legacy``
    (:func:`spec_id_view`), so a committed config that pins the legacy value keeps its run id
    and a config that says nothing gets the new default under a new id.  Pin it inside the
    component's mapping (``{template: ours}`` hashes as ``{}``, not as ``true``).
    """
    return dataclasses.field(default=default, metadata={"legacy": legacy})


def _added_params(name: str) -> dict:
    cls = COMPONENTS.get(name)
    return {f.name: f for f in dataclasses.fields(cls.Params) if "legacy" in f.metadata}


def explicit_spec(spec: dict) -> dict:
    """``components`` with every :func:`added_param` of an enabled component written out."""
    out = {}
    for name, raw in (spec or {}).items():
        if name in COMPONENTS and component_enabled(raw) and _added_params(name):
            raw = {} if raw is True else dict(raw)
            for key, f in _added_params(name).items():
                raw.setdefault(key, f.default)
        out[name] = raw
    return out


def spec_id_view(spec: dict) -> dict:
    """``components`` as hashed into the run id: :func:`added_param` values equal to ``legacy`` left out."""
    out = {}
    for name, raw in (spec or {}).items():
        if name in COMPONENTS and isinstance(raw, dict):
            legacy = {k: f.metadata["legacy"] for k, f in _added_params(name).items()}
            raw = {k: v for k, v in raw.items() if not (k in legacy and v == legacy[k])}
        out[name] = raw
    return out


# ------------------------------------------------------------------------- building
def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def load_plugins(plugins, source: str | None = None) -> None:
    """Import user modules that register components: dotted module names or ``.py`` paths."""
    for entry in plugins or ():
        if str(entry).endswith(".py"):
            path = Path(entry).expanduser()
            if not path.is_file():
                raise ConfigError(f"{_where(source)}plugins: file {entry} not found "
                                  f"(paths are relative to the working directory {Path.cwd()})")
            if _loaded_from(path):  # already imported (e.g. by pytest under another module name)
                continue
            mod_name = f"_unisd_plugin_{path.stem}"  # never shadows an importable module
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as e:
                raise ConfigError(f"{_where(source)}plugins: cannot import '{entry}' ({e})") from None


def _loaded_from(path: Path) -> bool:
    target = path.resolve()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.endswith(path.name) and Path(f).resolve() == target:
            return True
    return False


def component_enabled(raw: Any) -> bool:
    """A config entry is on when it is a mapping (its params) or ``true``; off for ``false``/null."""
    return raw is True or isinstance(raw, dict)


def build_component(name: str, raw: Any, source: str | None = None) -> Component | None:
    """One config entry -> a component instance (None when disabled)."""
    if name not in COMPONENTS:
        known = ", ".join(COMPONENTS.names())
        raise ConfigError(f"{_where(source)}components.{name}: unknown component '{name}'"
                          f"{did_you_mean(name, COMPONENTS.names())}; known: {known} "
                          "(a component of your own must be imported first: list its module in `plugins:`)")
    if raw is None or raw is False:
        return None
    if raw is not True and not isinstance(raw, dict):
        raise ConfigError(f"{_where(source)}components.{name}: expected a mapping of parameters, "
                          f"true or false, got {raw!r}")
    cls = COMPONENTS.get(name)
    try:
        params = from_dict(cls.Params, {} if raw is True else dict(raw), Source())
    except ConfigError as e:
        raise ConfigError(f"{_where(source)}components.{name}: {e}") from None
    return cls(params)


def build_components(spec: dict, source: str | None = None) -> list[Component]:
    """The enabled components in config order; checks the one-provider rule."""
    comps = [c for c in (build_component(n, raw, source) for n, raw in (spec or {}).items()) if c is not None]
    providers = [c.name for c in comps if c.provides_teacher]
    if len(providers) > 1:
        raise ConfigError(f"{_where(source)}components: {' and '.join(providers)} both provide teacher "
                          "targets; enable exactly one teacher provider")
    if not providers:
        names = [n for n, cls in COMPONENTS.items() if cls.provides_teacher]
        raise ConfigError(f"{_where(source)}components: no teacher provider is enabled; add one of "
                          f"{', '.join(names)} (e.g. `in_context_teacher: {{}}`)")
    return comps


def components_table(spec: dict) -> dict[str, bool]:
    """{name: enabled} for EVERY registered component (run.json ``components``)."""
    return {name: component_enabled((spec or {}).get(name)) for name in COMPONENTS.names()}


def needs_of(components) -> set[str]:
    out: set[str] = set()
    for c in components:
        out |= set(c.needs)
    return out
