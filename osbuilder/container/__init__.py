"""USE_DOCKER=yes: each step runs inside a tools container, so the host needs only Python and an engine.

`engine.py` finds and probes the engine (CONTAINER_ENGINE), `tools_image.py` builds the tools image
from `Containerfile` (TOOLS_BASE_IMAGE, the Debian packages `check-deps` lists, osbuilder itself),
`step.py` runs `osbuilder <step>` in it with WORKDIR and the per-user cache mounted at their own
paths. Everything is checked before WORKDIR is touched: the engine is installed and runs a container
that may do what mmdebstrap needs, and the base image exists.
"""

from __future__ import annotations

from osbuilder import steps
from osbuilder.settings import Settings


def run_step(settings: Settings, command: str, argv: list[str], *, console: bool = False) -> int:
    """Run the subcommand `command` with its own arguments `argv` in the tools image and return its exit
    code (`console`: it gives the user the guest's console)."""
    from osbuilder.container import engine, step, tools_image

    chosen = engine.select(settings, lambda candidate: tools_image.base_image(candidate, settings))
    return step.run_step(chosen, settings, step.Invocation(command, tuple(argv), console))


def describe(settings: Settings) -> str:
    """One line for `osbuilder help`: where the steps run, with which engine and image."""
    from osbuilder.container import engine, tools_image
    from osbuilder.errors import OsbuilderError

    if not settings.use_docker:
        return "Steps run on this host (USE_DOCKER=no); `osbuilder check-deps` lists the tools they need"
    found = engine.installed(settings)
    if not found:
        return (f"Container (USE_DOCKER=yes): no engine: {' or '.join(engine.wanted(settings))} not found "
                "on PATH (CONTAINER_ENGINE)")
    name, path = found[0]
    try:
        image = tools_image.tag_for(engine.Engine(name, path), settings, pull=False)
        state = "built" if tools_image.image_id(engine.Engine(name, path), image) else "built at the first step"
    except OsbuilderError as e:
        image, state = "not known yet", e.message
    return (f"Container (USE_DOCKER=yes): engine {name} ({path}); tools image {image} ({state}) on "
            f"TOOLS_BASE_IMAGE {settings.tools_base_image}; steps run in it: {', '.join(steps.in_container())}")
