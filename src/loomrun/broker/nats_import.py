"""nats-py, imported without what a command never uses."""

from __future__ import annotations

import sys
import threading
from pathlib import Path


def import_nats():
    """nats-py without what a command never uses, each a noticeable part of its time:
    - the WebSocket transport (loomrun speaks nats:// and tls:// only): nats-py imports
      aiohttp for it when present, a fifth of a second;
    - JetStream (`nats.js`, 25 ms), which nats-py's client imports eagerly though a
      command does not touch it (see loomrun.buckets): it is loaded at first use instead,
      by the supervisor, `watch` and `log`;
    - importlib.metadata (9 ms), which it imports to read its own version for the CONNECT
      line: read here from its dist-info folder's name instead."""
    if "nats" in sys.modules:
        return sys.modules["nats"]
    # nats-py catches the ImportError of each and goes without
    masked = [name for name in ("aiohttp", "importlib.metadata") if name not in sys.modules]
    for name in masked:
        sys.modules[name] = None
    deferred = Deferred.of("nats", "js") if "nats.js" not in sys.modules else None
    if deferred is not None:
        sys.modules["nats.js"] = deferred  # what nats-py's `import nats.js` finds
    try:
        import nats
    finally:
        for name in masked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
        if sys.modules.get("nats.js") is deferred and type(deferred) is Deferred:
            # Out of sys.modules again: a later `import nats.js.errors` imports the
            # package whole, as an import of a submodule must (its parent first).
            del sys.modules["nats.js"]
    if deferred is not None and not hasattr(nats, "js"):
        nats.js = deferred  # what nats-py's `nats.js.api...` reaches
    if "importlib.metadata" in masked:
        nats.aio.client.__version__ = _dist_version(Path(nats.__file__).parent.parent, "nats_py")
    return nats


def _dist_version(site: Path, dist: str) -> str:
    """An installed distribution's version, from its `NAME-VERSION.dist-info` folder."""
    for found in site.glob(f"{dist}-*.dist-info"):
        return found.name[len(dist) + 1 : -len(".dist-info")]
    return "0.0.0"  # what nats-py says itself when it cannot tell


class Deferred(type(sys)):
    """A package module whose code has not run yet: it runs, once, at the first access to
    an attribute it lacks. (importlib's LazyLoader runs it at any access, and the import
    system reads `__spec__` at every `import package.name`.)"""

    _lock = threading.Lock()

    @classmethod
    def of(cls, package: str, name: str) -> Deferred | None:
        """`package.name`, not run; None when it cannot be found (the ordinary import then
        says why)."""
        import importlib.util

        top = importlib.util.find_spec(package)  # a top-level spec: nothing is imported
        if top is None or not top.submodule_search_locations:
            return None
        folder = Path(top.submodule_search_locations[0]) / name
        if not (folder / "__init__.py").is_file():  # not installed from source files
            return None
        spec = importlib.util.spec_from_file_location(
            f"{package}.{name}", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        module.__class__ = cls
        return module

    def __getattr__(self, attribute: str):
        with Deferred._lock:
            if type(self) is Deferred:
                loaded = sys.modules.setdefault(self.__name__, self)
                if loaded is not self:  # imported whole meanwhile
                    return getattr(loaded, attribute)
                self.__class__ = type(sys)
                try:
                    self.__spec__.loader.exec_module(self)
                except BaseException:
                    del sys.modules[self.__name__]
                    self.__class__ = Deferred  # the next access tries again, and says why
                    raise
        return getattr(self, attribute)
