"""The plugin host: one pluggy manager, the built-in plugin, and third-party entry points.

Loading rules (documented in CONTRIBUTING.md):

* Built-in parts live in ``krea2kit.builtins`` and register through the public hooks.
* Third-party plugins are entry points in the group ``krea2kit``, loaded one at a time.
  A plugin that fails to import, implements a misspelled hook (``check_pending``) or
  raises while registering is reported on stderr and skipped; with
  ``KREA2KIT_STRICT_PLUGINS=1`` any of these is an error instead.
* ``KREA2KIT_PLUGINS`` selects which third-party plugins load: unset = all, a
  comma-separated list of entry-point names = only those, empty or ``none`` = none.
* Two plugins registering the same part name is a clash: both are kept, the clash is
  reported, and recipes must then name the part as ``plugin:name``.
* A plugin module may state the plugin contract it was written for
  (``KREA2KIT_CONTRACT = 2``, see :mod:`krea2kit.contracts`). One that needs a newer
  contract than this krea2kit provides, or states one older than it still supports, is
  skipped with a warning (an error under ``KREA2KIT_STRICT_PLUGINS=1``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace
from importlib import metadata

import pluggy

from krea2kit import hookspecs
from krea2kit.contracts import CONTRACT_VERSION, OLDEST_SUPPORTED_CONTRACT, PLUGIN_CONTRACT_ATTRIBUTE
from krea2kit.errors import PluginError
from krea2kit.registry import HOOK_KINDS, Descriptor, OptionsDescriptor, Registry

ENTRY_POINT_GROUP = "krea2kit"
ENV_SELECT = "KREA2KIT_PLUGINS"
ENV_STRICT = "KREA2KIT_STRICT_PLUGINS"
BUILTIN_NAME = "krea2kit"
DEFAULT_PLUGINS = ("krea2kit.builtins",)


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    contract: int | None = None  # the plugin contract it states it was written for, if any

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "builtin": self.builtin,
            "contract": self.contract,
            "hooks": sorted(self.hooks),
            "registers": {k: sorted(v) for k, v in sorted(self.registers.items()) if v},
            "commands": sorted(self.commands),
        }


def stated_contract(plugin: object) -> int | None:
    """The contract version a plugin module states (``KREA2KIT_CONTRACT``): an int, or a
    string ``"2"`` / ``">=2"``; ``None`` when it states none. ValueError when unreadable."""
    raw = getattr(plugin, PLUGIN_CONTRACT_ATTRIBUTE, None)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"{PLUGIN_CONTRACT_ATTRIBUTE} = {raw!r} is not a version number")
    text = str(raw).strip().removeprefix(">=").strip()
    if not text.isdigit():
        raise ValueError(f"{PLUGIN_CONTRACT_ATTRIBUTE} = {raw!r} is not a version number (write e.g. 2)")
    return int(text)


def contract_json() -> dict:
    """The contract this krea2kit provides, as ``plugins --json`` shows it."""
    return {"version": CONTRACT_VERSION, "oldest_supported": OLDEST_SUPPORTED_CONTRACT,
            "attribute": PLUGIN_CONTRACT_ATTRIBUTE, "reference": "krea2kit.contracts"}


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() not in {"", "0", "false", "no"}


def _selection() -> set[str] | None:
    raw = os.environ.get(ENV_SELECT)
    if raw is None:
        return None
    raw = raw.strip()
    if raw.lower() in {"", "none"}:
        return set()
    return {p.strip() for p in raw.split(",") if p.strip()}


class Host:
    """The loaded plugins and everything they registered."""

    def __init__(self, *, load_entry_points: bool = True, extra_plugins: tuple = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}
        self.problems: list[str] = []  # one line each, printed on stderr by the CLI
        self.strict = _strict()
        from krea2kit import __version__

        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self._add(module, PluginInfo(BUILTIN_NAME, "krea2kit", __version__, module_name, True))
        for plugin, name in extra_plugins:  # used by tests and embedding applications
            self._add(plugin, PluginInfo(name, "", "", getattr(plugin, "__name__", name), False))
        if load_entry_points:
            self._load_entry_points()
        self._collect()
        for (kind, name), owners in sorted(self.registry.clashes.items()):
            self._problem(
                f"plugin clash: {kind.replace('_', ' ')} {name!r} is registered by {', '.join(owners)}; "
                f"recipes must name it as PLUGIN:{name}"
            )

    # -- reporting ---------------------------------------------------------
    def _problem(self, message: str) -> None:
        if self.strict:
            raise PluginError(message, hint=f"unset {ENV_STRICT} to skip broken plugins with a warning instead")
        self.problems.append(message)

    # -- loading -----------------------------------------------------------
    def _load_entry_points(self) -> None:
        selected = _selection()
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        for ep in eps:
            if selected is not None and ep.name not in selected:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else ""
            version = dist.version if dist is not None else ""
            if ep.name in self.plugins:
                self._problem(f"plugin {ep.name!r} from {dist_name or '?'} has the name of an already loaded plugin; skipped")
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                self._problem(f"plugin {ep.name!r} ({dist_name} {version}) failed to import: {type(exc).__name__}: {exc}; skipped")
                continue
            self._add(obj, PluginInfo(ep.name, dist_name, version, ep.value, False))
        if selected:
            missing = selected - set(self.plugins)
            for name in sorted(missing):
                self._problem(f"{ENV_SELECT} names plugin {name!r}, which is not installed")

    def _add(self, plugin: object, info: PluginInfo) -> None:
        try:
            info.contract = stated_contract(plugin)
        except ValueError as exc:
            self._refuse(info, f"plugin {info.name!r} is invalid: {exc}; skipped")
            return
        if info.contract is not None and info.contract > CONTRACT_VERSION:
            self._refuse(info, f"plugin {info.name!r} ({info.distribution} {info.version}) needs plugin contract "
                               f"{info.contract}, but this krea2kit provides contract {CONTRACT_VERSION}; skipped "
                               f"(upgrade krea2kit)")
            return
        if info.contract is not None and info.contract < OLDEST_SUPPORTED_CONTRACT:
            self._refuse(info, f"plugin {info.name!r} ({info.distribution} {info.version}) was written for plugin "
                               f"contract {info.contract}; this krea2kit supports {OLDEST_SUPPORTED_CONTRACT} to "
                               f"{CONTRACT_VERSION}; skipped (update the plugin: every load is load(options, context))")
            return
        try:
            self.pm.register(plugin, name=info.name)
            # A hook implementation without a matching spec (a typo) is an error.
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            message = f"plugin {info.name!r} is invalid: {exc}; skipped"
            if info.builtin:
                raise PluginError(message)
            self._problem(message)
            return
        info.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or [])
        self.plugins[info.name] = info

    def _refuse(self, info: PluginInfo, message: str) -> None:
        if info.builtin:
            raise PluginError(message)
        self._problem(message)

    def _collect(self) -> None:
        """Call every registration hook, one implementation at a time, so each
        descriptor is attributed to its plugin and a broken plugin is isolated."""
        broken: set[str] = set()
        for hook_name, cls in HOOK_KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                name = self.pm.get_name(impl.plugin)
                if name in broken:
                    continue
                found: list[Descriptor] = []

                def register(descriptor, _found=found, _cls=cls, _hook=hook_name, _plugin=name):
                    if not isinstance(descriptor, _cls):
                        raise TypeError(f"{_hook} expects {_cls.__name__}, got {type(descriptor).__name__}")
                    if isinstance(descriptor, OptionsDescriptor) and descriptor.name != _plugin:
                        # parts receive the [plugins.<their plugin>] table; another name would
                        # validate and then never reach them
                        raise ValueError(f"OptionsDescriptor(name={descriptor.name!r}) must be named after the "
                                         f"plugin ({_plugin!r}): its table is [plugins.{_plugin}]")
                    _found.append(descriptor)

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:
                    broken.add(name)
                    self._problem(f"plugin {name!r} failed in {hook_name}: {type(exc).__name__}: {exc}; skipped")
                    continue
                info = self.plugins[name]
                for descriptor in found:
                    self.registry.add(replace(descriptor, plugin=name))
                    info.registers.setdefault(cls.kind, []).append(descriptor.name)
        for name in broken:  # a half-registered plugin is removed entirely
            self._drop(name)

    def _drop(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        if info is None:
            return
        kept = Registry()
        for kind in HOOK_KINDS.values():
            for d in self.registry.all(kind.kind):
                if d.plugin != name:
                    kept.add(d)
        self.registry = kept

    # -- commands ----------------------------------------------------------
    def add_commands(self, cli) -> None:
        """Let every plugin add its click commands to ``cli``."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            name = self.pm.get_name(impl.plugin)
            before = set(cli.commands)
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:
                self._problem(f"plugin {name!r} failed in register_commands: {type(exc).__name__}: {exc}; skipped")
                continue
            if name in self.plugins:
                self.plugins[name].commands.extend(sorted(set(cli.commands) - before))


_HOST: Host | None = None


def get_host() -> Host:
    """The process-wide host, loaded on first use."""
    global _HOST
    if _HOST is None:
        _HOST = Host()
    return _HOST


def reset_host(host: Host | None = None) -> None:
    """Replace (or forget) the process-wide host; for tests and embedding applications."""
    global _HOST
    _HOST = host
