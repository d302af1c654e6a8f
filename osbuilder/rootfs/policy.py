"""What every guest tree must (not) hold, whichever distribution plugin made it.

Applied by the rootfs step after the plugin built the tree, inside the tree's namespace (a rootless
build's files belong to subordinate ids), then verified, so a plugin cannot drop a rule by accident:

- no SSH host keys: every image would share them; each boot makes its own into /run;
- no documentation, manual pages, info pages or translations: a container guest reads none of them
  (copyright files stay: the licences travel with the binaries).

A tree that still breaks a rule after `apply` fails the step, naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from osbuilder import userns
from osbuilder.errors import OsbuilderError
from osbuilder.run import run

HOST_KEYS = ("etc/ssh", "ssh_host_")  # directory, file name prefix
DOC_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")
KEEP = "copyright"  # usr/share/doc/<package>/copyright

# Runs in the tree's namespace; $1 is the tree. Removes what `verify` forbids.
APPLY = r"""set -e
cd "$1"
rm -f etc/ssh/ssh_host_*
for d in {docs}; do
  [ -d "$d" ] || continue
  find "$d" -mindepth 1 \( -type f -o -type l \) ! -path "usr/share/doc/*/{keep}" -delete
  find "$d" -mindepth 1 -depth -type d -empty -delete
done
""".format(docs=" ".join(DOC_DIRS), keep=KEEP)


def apply(tree: Path, logfile: Path) -> None:
    """Remove from `tree` whatever the rules forbid."""
    run(userns.in_tree_namespace(["sh", "-c", APPLY, "policy", str(tree)]), step="rootfs", logfile=logfile)


def violations(tree: Path) -> list[str]:
    """The paths (as in the guest) that break a rule."""
    found = []
    keys_dir, prefix = HOST_KEYS
    if (tree / keys_dir).is_dir():
        found += [f"/{keys_dir}/{name}" for name in sorted(os.listdir(tree / keys_dir)) if name.startswith(prefix)]
    for d in DOC_DIRS:
        for dirpath, _, filenames in os.walk(tree / d):
            for name in filenames:
                path = Path(dirpath, name)
                rel = path.relative_to(tree)
                if not (rel.parts[:3] == ("usr", "share", "doc") and name == KEEP):
                    found.append(f"/{rel}")
    return found


def verify(tree: Path) -> None:
    """Raise naming the first paths that break a rule."""
    found = violations(tree)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise OsbuilderError(f"rootfs: the tree breaks osbuilder's image policy: {', '.join(found[:3])}{more}",
                             "no SSH host keys, no documentation (osbuilder/rootfs/policy.py)")
