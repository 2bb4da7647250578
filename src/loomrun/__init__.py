"""loomrun: launch a PyTorch job like torchrun, then steer it while it trains.

Inside a worker, `import loomrun` is the API: `loomrun.param`, `@loomrun.handler`,
`loomrun.step`, `loomrun.report`, `loomrun.track`, and `loomrun.Field` (a field's bounds and doc, in
`typing.Annotated`). Outside loomrun each is a cheap no-op, so the same
script runs under plain `python`. The names load lazily: the supervisor and the CLI
import this package and must stay light.
"""

_API = {"param", "handler", "step", "report", "track", "Param"}


def __getattr__(name: str):
    if name == "Field":
        from loomrun.fields import Field

        globals()[name] = Field
        return Field
    if name in _API:
        from loomrun.runtime import api

        value = globals()[name] = getattr(api, name)  # later lookups skip this function
        return value
    raise AttributeError(f"module 'loomrun' has no attribute {name!r}")


def __dir__():
    return sorted(_API | {"Field"} | set(globals()))
