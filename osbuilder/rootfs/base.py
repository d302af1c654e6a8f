"""The base tree: what the distribution plugin makes of the package list, before osbuilder adds its files.

Rootfs that differ only in what osbuilder puts over the packages (the agent, its unit and AGENT_SERVICE,
osbuilder's overlay, osbuilder.yaml) share one base tree, built once per set of inputs that shape it:
the distribution, release, suites and the state of their archive, the mirror (without credentials), the
package list, SOURCE_DATE_EPOCH, the plugin's code and tools, the architecture, and who owns its files
(root, or the user's subordinate ids: a tree made in one mapping is nobody's in another). It lives in the
per-user cache (CACHE_DIR/artifacts/rootfs-base/<key>/rootfs), so a fresh WORKDIR reuses it, under the
cache's discipline: built in a temporary and renamed into place, a content record checked on each hit
(a torn entry is rebuilt), a lock so that processes build it once and none replaces it while another
copies it. The image policy is applied to it too, so the cache holds no SSH host keys.

The rootfs step (`build.py`) copies it (`copy`: directories made, files hard-linked where the filesystem
allows) and unpacks its overlay over the copy. A rootless build
shares it only where its namespace reaches the cache (every directory on the way searchable by others);
elsewhere the base is built for that one rootfs, with a warning saying how to share it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from osbuilder import __version__, errors, userns
from osbuilder.cache import MANIFEST, Cache, Manifest, tree_record
from osbuilder.fs import can_link, file_hash
from osbuilder.layout import ROOTFS, UserCache, Workdir
from osbuilder.rootfs import distros, foreign, inputs, policy
from osbuilder.rootfs.distro import Suite
from osbuilder.run import tool_version
from osbuilder.settings import Settings
from osbuilder.urls import without_credentials

log = logging.getLogger("osbuilder")

KIND = "rootfs-base"  # its cache entries: CACHE_DIR/artifacts/rootfs-base/<key>/rootfs


def packages(settings: Settings) -> list[str]:
    """The full package list: the distro's defaults, then EXTRA_PKGS, without duplicates."""
    d = distros.get(settings.distro)
    return list(dict.fromkeys([*d.default_packages(settings.agent_init), *settings.extra_pkgs]))


def suites(settings: Settings) -> list[Suite]:
    """The suites the rootfs is installed from: OS_VERSION, and its updates unless SECURITY_UPDATES=no."""
    d = distros.get(settings.distro)
    return d.suites(settings.os_version, settings.repo_url or d.default_mirror, settings.security_updates)


def manifest(settings: Settings) -> Manifest:
    """Every input that shapes the base tree, and nothing of what osbuilder adds over it."""
    d = distros.get(settings.distro)
    release, *updates = suites(settings)
    return Manifest(KIND, {
        "distro": settings.distro,
        "os_version": settings.os_version,
        "repo_url": without_credentials(settings.repo_url or d.default_mirror),  # the manifest is stored
        "suites": " ".join(f"{s.name}@{without_credentials(s.mirror)}" for s in (release, *updates)),
        "packages": " ".join(packages(settings)),
        "source_date_epoch": str(settings.source_date_epoch),
        "tool": "; ".join(tool_version(t.program) for t in d.tools),
        "osbuilder": __version__,
        "distro_code": inputs.plugin_code(d),
        "base_code": file_hash(Path(__file__), Path(policy.__file__)),
        "arch": d.architecture(settings.guest.machine),
        "owners": userns.owners(),
        # a new Release (point release, updates of a moving suite) makes a new tree; so does a
        # security or stable update (SECURITY_UPDATES)
        "archive_date": inputs.archive_date(settings, d, release.mirror, release.name),
        "archive_updates": inputs.archive_state(settings, d, updates),
    })


def cache(settings: Settings) -> Cache:
    return Cache(UserCache.of(settings).artifacts, setting="CACHE_DIR")


def build(settings: Settings, dest: Path, logfile: Path, setting: str, place: Path) -> None:
    """The plugin's tree at `dest` (which must not exist), with the image policy applied. A full disk is
    one line naming `setting` and its directory `place` that `dest` is in (CACHE_DIR, or WORKDIR for a
    base that is not shared)."""
    d = distros.get(settings.distro)
    with errors.disk_space(setting, f"in {place} while building the base tree (nothing was kept)", dest.parent):
        guest = settings.guest
        foreign.ensure(guest, logfile)
        d.build(suites(settings), packages(settings), dest, logfile=logfile, verbose=settings.debug,
                source_date_epoch=settings.source_date_epoch, architecture=d.architecture(guest.machine))
        policy.apply(dest, logfile)


def copy(settings: Settings, dest: Path, logfile: Path, *, rebuild: bool = False,
         session: str | None = None) -> dict[str, str]:
    """`dest` (which must not exist) becomes a copy of the base tree for `settings`, which is built first
    when the cache has none (or a torn one; `rebuild`: once per `session`, as every cache entry). Where
    the filesystem allows, the copy's files are hard links to the entry's (userns.share_tree): no data
    is written, and the rootfs step only ever replaces or removes a file of it, never writes one. Returns
    the base tree's content record (relative to the tree; {} for a base that is not shared), so that the
    rootfs's own record need not read again the files it copied (cache.Copied)."""
    shared = cache(settings)
    m = manifest(settings)
    kind_dir = shared.entry(m).parent
    with errors.disk_space("CACHE_DIR", f"in {shared.root}", shared.root.parent):
        kind_dir.mkdir(parents=True, exist_ok=True)
    blocked = userns.unreachable(kind_dir) if userns.rootless() else None
    if blocked is not None:
        log.warning("rootfs: the base tree is built for this rootfs alone, not shared through CACHE_DIR: %s is "
                    "not searchable by other users (mode %o), and a rootless build's namespace must pass it; "
                    "`chmod o+x %s`, or another CACHE_DIR, to share it", blocked, blocked.stat().st_mode & 0o777,
                    blocked)
        build(settings, dest, logfile, "WORKDIR", Workdir.of(settings).root)
        return {}

    def fill(tmp: Path) -> None:
        tmp.chmod(0o755)  # the tree's namespace (and apt's _apt) must pass it, whatever the umask
        build(settings, tmp / ROOTFS, logfile, "CACHE_DIR", UserCache.of(settings).root)

    with shared.held(m, fill, rebuild, session) as entry:
        where = f"in {Workdir.of(settings).root} while copying the base tree (nothing was replaced)"
        with errors.disk_space("WORKDIR", where, dest.parent):
            if can_link(entry / MANIFEST, dest.parent):
                log.info("rootfs: linking the base tree's files %s", entry / ROOTFS)
                userns.share_tree(entry / ROOTFS, dest, logfile)
            else:
                log.info("rootfs: copying the base tree %s", entry / ROOTFS)
                userns.copy_tree(entry / ROOTFS, dest, logfile)
        return tree_record(entry, ROOTFS)
