"""The tools image of USE_DOCKER: TOOLS_BASE_IMAGE, the Debian packages `check-deps` lists, and osbuilder.

Its tag is a hash of every input (the Containerfile, the package list, osbuilder's Python
requirements and files, the base image's name and id), so it is built once and rebuilt only when
one of them changes; the engine's layer cache keeps the Debian packages when only osbuilder
changed. Builds take a lock in the per-user cache, so parallel runs build it once, and (podman)
keep apt's downloads there for the next build. Progress shows while it builds; the log is
CACHE_DIR/logs/tools-image.log.
Every build leaves an image of REPOSITORY behind; `osbuilder cache list` shows them (`local_images`),
`osbuilder cache prune` removes those other than the current settings' tag (`current_tag`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from filelock import FileLock

import osbuilder
from osbuilder import steps
from osbuilder.container.engine import Engine, cannot_run
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.layout import UserCache
from osbuilder.run import run
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")

CONTAINERFILE = Path(__file__).with_name("Containerfile")
PACKAGE_DIR = Path(osbuilder.__file__).resolve().parent
REPOSITORY = "localhost/osbuilder-tools"
PYTHON_PACKAGES = ("python3", "python3-venv")  # osbuilder itself runs on the image's Python


def system_packages(settings: Settings) -> list[str]:
    """Every Debian package the steps need under these settings (what `osbuilder check-deps --install`
    installs), and Python."""
    return sorted(set(steps.packages(settings)) | set(PYTHON_PACKAGES))


def python_requirements() -> list[str]:
    """osbuilder's own run-time requirements (its package metadata, extras left out)."""
    try:
        wanted = importlib.metadata.requires("osbuilder") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("USE_DOCKER: osbuilder is not installed as a package (pip install .), so its "
                         "requirements for the tools image are unknown") from None
    return sorted(r for r in wanted if "extra ==" not in r)


def package_files(root: Path | None = None) -> list[Path]:
    root = root or PACKAGE_DIR
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def digest(base: str, base_id: str, packages: list[str], root: Path | None = None) -> str:
    """The hash the tag is made of: every input of the build."""
    root = root or PACKAGE_DIR
    h = hashlib.sha256()
    for part in (CONTAINERFILE.read_bytes(), "\n".join(packages).encode(),
                 "\n".join(python_requirements()).encode(), base.encode(), base_id.encode()):
        h.update(part + b"\0\0")
    for path in package_files(root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def image_id(engine: Engine, name: str) -> str | None:
    """The id of a local image, None when there is none by that name."""
    try:
        result = run(engine.command("image", "inspect", "--format", "{{.Id}}", name), step="container",
                     capture=True, timeout=60)
    except OsbuilderError as e:
        if "Cannot connect to the Docker daemon" in e.detail:  # not "no such image": the engine is down
            raise cannot_run(engine, e) from None
        return None
    return result.stdout.decode().strip() or None


def base_image(engine: Engine, settings: Settings, pull: bool = True) -> str:
    """TOOLS_BASE_IMAGE's id, pulled first when it is not a local image (without `pull`: an error)."""
    name = settings.tools_base_image
    found = image_id(engine, name)
    if found:
        return found
    if not pull:
        raise UsageError(f"TOOLS_BASE_IMAGE: {name} is not a local {engine.name} image yet (pulled at the first step)")
    log.info("container: TOOLS_BASE_IMAGE %s is not a local image; pulling it", name)
    try:
        run(engine.command("pull", name), step="container", capture=True, timeout=600)
    except OsbuilderError as e:
        said = next((line for line in reversed(e.detail.splitlines()) if line.strip()), "")
        raise UsageError(
            f"TOOLS_BASE_IMAGE: {name} is not a local {engine.name} image and cannot be pulled ({said.strip()[:160]}); "
            f"make one from the Debian archive: mmdebstrap --variant=minbase bookworm base.tar && "
            f"{engine.name} import base.tar {name}", e.detail) from None
    found = image_id(engine, name)
    if not found:
        raise UsageError(f"TOOLS_BASE_IMAGE: {engine.name} pulled {name} but cannot find it")
    return found


def tag_for(engine: Engine, settings: Settings, pull: bool = True) -> str:
    base_id = base_image(engine, settings, pull)
    return f"{REPOSITORY}:{digest(settings.tools_base_image, base_id, system_packages(settings))[:20]}"


def ensure(engine: Engine, settings: Settings) -> str:
    """The tools image's tag, built first unless an image with that tag exists."""
    tag = tag_for(engine, settings)
    if image_id(engine, tag):
        return tag
    cache = UserCache.of(settings)
    cache.root.mkdir(parents=True, exist_ok=True)
    with FileLock(cache.tools_image_lock):
        if not image_id(engine, tag):  # another run may have built it while this one waited
            build(engine, settings, tag)
    return tag


def build(engine: Engine, settings: Settings, tag: str) -> None:
    cache = UserCache.of(settings)
    packages = system_packages(settings)
    log.info("container: building the tools image %s on %s (%d Debian packages, osbuilder %s); "
             "later runs reuse it", tag, settings.tools_base_image, len(packages), osbuilder.__version__)
    with tempfile.TemporaryDirectory(prefix="osbuilder-tools-context-") as tmp:
        context = Path(tmp)
        write_context(context, packages)
        cmd = engine.command("build", "--network=host", *engine.run_options,
                             "--build-arg", f"BASE={settings.tools_base_image}", "-t", tag,
                             "-f", str(context / "Containerfile"))
        if engine.name == "podman":  # docker build cannot mount a directory
            cache.apt_archives.mkdir(parents=True, exist_ok=True)
            cmd += ["-v", f"{cache.apt_archives}:/var/cache/apt/archives"]
        try:
            run([*cmd, str(context)], step="tools-image", logfile=cache.log("tools-image"), verbose=settings.debug)
        except OsbuilderError as e:
            if re.search(r"Temporary failure resolving|Could not connect|Failed to fetch|Connection refused|"
                         r"No matching distribution", e.detail):
                raise InfrastructureError("TOOLS_BASE_IMAGE: building the tools image needs the Debian archive "
                                          "and PyPI, and one of them is unreachable", e.detail) from None
            raise OsbuilderError(f"TOOLS_BASE_IMAGE: building the tools image on {settings.tools_base_image} "
                                 f"failed (log: {cache.log('tools-image')})", e.detail) from None


def write_context(context: Path, packages: list[str]) -> None:
    """The build context: the Containerfile, the package lists, osbuilder, and pip's CA bundle."""
    shutil.copy2(CONTAINERFILE, context / "Containerfile")
    (context / "packages.txt").write_text("\n".join(packages) + "\n")
    (context / "requirements.txt").write_text("\n".join(python_requirements()) + "\n")
    for path in package_files(PACKAGE_DIR):
        dest = context / "osbuilder" / path.relative_to(PACKAGE_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (context / "pip").mkdir()
    bundle = ca_bundle()
    if bundle:
        shutil.copyfile(bundle, context / "pip" / "ca.crt")


def ca_bundle() -> Path | None:
    """The CA certificates the host's pip trusts (a TLS-inspecting proxy's CA is often among them)."""
    named = [os.environ.get(v, "") for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    named += [ssl.get_default_verify_paths().cafile or "", "/etc/ssl/certs/ca-certificates.crt"]
    return next((Path(p) for p in named if p and Path(p).is_file()), None)


# -- the images builds left behind (osbuilder cache list, prune) -------------------------------------------


@dataclass(frozen=True)
class LocalImage:
    """One tag of REPOSITORY in an engine's store."""

    ref: str  # REPOSITORY:tag
    id: str
    size: int  # bytes, as the engine counts them (layers shared with other images included)
    created: float | None  # seconds since the epoch


def local_images(engine: Engine, step: str = "cache") -> list[LocalImage]:
    """The tools images `engine` holds, newest first (the same commands on podman and docker).
    An OsbuilderError when the engine does not answer (a Docker daemon that is down)."""
    listed = run(engine.command("images", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY), step=step,
                 capture=True, timeout=60)
    refs = sorted({line.strip() for line in listed.stdout.decode(errors="replace").splitlines()
                   if line.strip().startswith(REPOSITORY + ":") and "<none>" not in line})
    if not refs:
        return []
    inspected = run(engine.command("image", "inspect", "--format", "{{.Id}}\t{{.Size}}\t{{.Created}}", *refs),
                    step=step, capture=True, timeout=60)
    found = []
    for ref, line in zip(refs, inspected.stdout.decode(errors="replace").splitlines(), strict=False):
        ident, _, rest = line.partition("\t")
        size, _, created = rest.partition("\t")
        found.append(LocalImage(ref, ident.strip(), int(size) if size.strip().isdigit() else 0,
                                parse_created(created)))
    return sorted(found, key=lambda image: image.created or 0.0, reverse=True)


def parse_created(text: str) -> float | None:
    """An engine's creation time: podman's `2026-01-02 15:04:05.123 +0000 UTC`, docker's
    `2026-01-02T15:04:05.123Z`; None when it is neither."""
    found = re.match(r"\s*(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:\.\d+)?\s*(Z|[+-]\d\d:?\d\d)?", text)
    if not found:
        return None
    offset = (found.group(3) or "Z").replace("Z", "+0000").replace(":", "")
    return datetime.strptime(f"{found.group(1)} {found.group(2)} {offset}", "%Y-%m-%d %H:%M:%S %z").timestamp()


def current_tag(engine: Engine, settings: Settings) -> str | None:
    """The tag these settings' steps would run in, or None when it cannot be told without pulling or building
    (TOOLS_BASE_IMAGE is not a local image, osbuilder is not installed as a package)."""
    try:
        return tag_for(engine, settings, pull=False)
    except OsbuilderError as e:
        log.debug("container: the current tools image's tag is unknown: %s", e.message)
        return None


def remove_image(engine: Engine, ref: str, step: str = "cache") -> None:
    """Untag `ref` (the image goes with its last tag); an OsbuilderError with the engine's words when it
    refuses (a container still uses the image)."""
    run(engine.command("rmi", ref), step=step, capture=True, timeout=120)
