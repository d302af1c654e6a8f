"""pytest fixtures for boot checks: the boot kernel, the accelerator, the session SSH key, guests.

    def test_something(booted_guest):            # module-scoped: one boot, many assertions
        assert booted_guest.exec(["true"]).status == 0

    def test_broken(boot_guest, tmp_path):       # a guest of your own, stopped after the test
        with pytest.raises(BootFailure):
            guest = boot_guest(my_image)
            bootcheck.boot_to_ready(guest)

Guests boot the session's `image` on throw-away qcow2 overlays; logs go to
WORKDIR/boot-logs/<test>/ (printed in failures). BOOT_KERNEL=built takes the kernel engineer's
`kernel` fixture (its .path holds vmlinuz.container); auto and debian use `commands.boot_kernel`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from osbuilder.settings import Settings
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import bootcheck, commands, ssh
from osbuilder.vm.debian_kernel import BootKernel


def note_logs(node: pytest.Item | pytest.Collector, log_dir: Path) -> None:
    """Remember a guest's log dir on the test node; boot_tests/conftest.py prints it on failure."""
    dirs = getattr(node, "_osbuilder_boot_logs", [])
    dirs.append(log_dir)
    node._osbuilder_boot_logs = dirs  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def boot_kernel(osbuilder_settings: Settings, osbuilder_cache, request: pytest.FixtureRequest) -> BootKernel:
    """The kernel boot checks use (BOOT_KERNEL)."""
    if osbuilder_settings.boot_kernel.strip() == "built":
        built = request.getfixturevalue("kernel")
        return BootKernel((Path(built.path) / commands.BUILT_KERNEL).absolute(), None, "built")
    return commands.boot_kernel(osbuilder_settings, cache=osbuilder_cache)


@pytest.fixture(scope="session")
def boot_accel(osbuilder_settings: Settings, boot_kernel: BootKernel) -> accel_mod.Accel:
    """KVM if ACCEL says so and (for auto) the probe proved it works; else TCG."""
    return accel_mod.choose(osbuilder_settings, boot_kernel)


@pytest.fixture(scope="session")
def ssh_session_key(tmp_path_factory: pytest.TempPathFactory) -> ssh.SessionKey:
    """An ed25519 key made for this test session; guests get its public half as a credential."""
    return ssh.make_session_key(tmp_path_factory.mktemp("ssh-key"))


def boot_options(settings: Settings, image: Path, kernel: BootKernel, accel: accel_mod.Accel,
                 key: ssh.SessionKey | None, log_dir: Path, name: str, append: str = "") -> bootcheck.BootOptions:
    extra = " ".join(p for p in (settings.boot_append, append) if p)
    return bootcheck.BootOptions(image=image, kernel=kernel, log_dir=log_dir, accel=accel,
                                 memory=settings.vm_memory, cpus=settings.vm_cpus, timeout=settings.boot_timeout,
                                 append=extra, ssh_key=key, name=name, agent_init=settings.agent_init)


@pytest.fixture
def boot_guest(osbuilder_settings: Settings, boot_kernel: BootKernel, boot_accel: accel_mod.Accel,
               ssh_session_key: ssh.SessionKey, request: pytest.FixtureRequest
               ) -> Iterator[Callable[..., bootcheck.Guest]]:
    """Factory: `boot_guest(image, append="", name=None)` starts a guest; all are stopped after the test."""
    guests: list[bootcheck.Guest] = []

    def start(image: Path, append: str = "", name: str | None = None, timeout: int | None = None
              ) -> bootcheck.Guest:
        label = name or f"{request.node.name}-{len(guests)}"
        log_dir = commands.log_dir_for(osbuilder_settings, label)
        opts = boot_options(osbuilder_settings, image, boot_kernel, boot_accel, ssh_session_key, log_dir, label,
                            append)
        if timeout:
            opts.timeout = timeout
        guest = bootcheck.Guest(opts)
        guests.append(guest)
        note_logs(request.node, log_dir)
        guest.start()
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.close()


@pytest.fixture(scope="module")
def booted_guest(osbuilder_settings: Settings, image, boot_kernel: BootKernel, boot_accel: accel_mod.Accel,
                 ssh_session_key: ssh.SessionKey, request: pytest.FixtureRequest) -> Iterator[bootcheck.Guest]:
    """The session image booted through every phase but powerdown (kernel, agent, running, exec, ssh).

    One boot per module; its tests each check one thing. If the boot fails, they all fail with
    the boot's error (phase, matched console lines, console tail, log dir).
    """
    name = f"{request.module.__name__.rsplit('.', 1)[-1]}-booted"
    log_dir = commands.log_dir_for(osbuilder_settings, name)
    opts = boot_options(osbuilder_settings, image.path, boot_kernel, boot_accel, ssh_session_key, log_dir, name)
    with bootcheck.booted(opts, osbuilder_settings) as guest:
        yield guest


@pytest.fixture
def guest(booted_guest: bootcheck.Guest, request: pytest.FixtureRequest) -> bootcheck.Guest:
    """`booted_guest`, with its log dir noted for this test's failure report."""
    note_logs(request.node, booted_guest.log_dir)
    return booted_guest
