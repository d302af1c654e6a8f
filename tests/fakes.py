"""Small stand-ins the unit tests share: the smallest tree `osbuilder image` accepts, a runtime's TOML."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from osbuilder.fs import sha256_file

KATA_TOML = """\
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinux.container"
image = "/usr/share/kata-containers/kata-containers.img"
# initrd = "/usr/share/kata-containers/kata-containers-initrd.img"
machine_type = "q35"

[agent.kata]
debug = false
"""


def make_tree(root: Path, *, init_target: str | None = "../lib/systemd/systemd", agent: bool = True,
              systemd: bool = True) -> Path:
    """A tree that passes (or, with the flags, fails) `image.check_tree`: init, systemd, the agent."""
    for d in ("usr/sbin", "usr/bin", "usr/lib/systemd", "var/lib/osbuilder", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "sbin").symlink_to("usr/sbin")
    if systemd:
        (root / "usr/lib/systemd/systemd").write_bytes(b"\x7fELF systemd")
        (root / "usr/lib/systemd/systemd").chmod(0o755)
    if init_target:
        (root / "usr/sbin/init").symlink_to(init_target)
    if agent:
        (root / "usr/bin/osbuilder-agent").write_bytes(b"\x7fELF agent")
        (root / "usr/bin/osbuilder-agent").chmod(0o755)
    (root / "var/lib/osbuilder/osbuilder.yaml").write_text(yaml.safe_dump({"agent": {"name": "osbuilder-agent"}}))
    (root / "etc/hostname").write_text("guest\n")
    return root


def workdir_entries(wd: Path) -> list[str]:
    """What a WORKDIR holds, for tests of what a step leaves: its top-level names, the cache's complete
    entries as `cache/<kind>/<entry>` (lock files and empty directories are not left-overs), and anything
    else in the cache by name (a temporary there is one)."""
    names = []
    for path in sorted(wd.iterdir()):
        if path.name != "cache":
            names.append(path.name)
            continue
        for kind in sorted(p for p in path.iterdir() if p.is_dir()):
            for entry in sorted(kind.iterdir()):
                if entry.name.endswith(".lock"):
                    continue
                names.append(f"cache/{kind.name}/" + ("<entry>" if (entry / "manifest.json").is_file() else entry.name))
    return names
def record_kernel_build(workdir: Path) -> Path:
    """kernel-metadata.json as `osbuilder kernel` writes it for the WORKDIR's vmlinuz and vmlinux: the
    record that ties the two (install-kernel's gate of vmlinux)."""
    outputs = {name: sha256_file(workdir / name) for name in ("vmlinuz.container", "vmlinux.container")}
    path = workdir / "kernel-metadata.json"
    path.write_text(json.dumps({"outputs": outputs}))
    return path
