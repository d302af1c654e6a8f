"""Booting artifacts under QEMU and proving, phase by phase, that they work.

From the bottom up (each module imports only those above it in this list):

    console.py        the serial console drained to a log and watched (fatal lines, milestones, progress)
    host.py           what the host gives a QEMU process of the CPU (schedstat): starved or not
    qemu.py           mechanism only: QEMU's command line, launch, QMP, shutdown
    ssh.py            the session key and paramiko logins
    systemd.py        parsing what systemd prints
    profiles.py       boot profiles (which phases apply, how the image is attached, who is PID 1),
                      phase Outcomes
    options.py        BootKernel, Accel, Budget(s), BootOptions: what one boot runs with
    accel.py          KVM or TCG: the probe runs kvm_probe.S's guest (the verdict lives in the per-user cache)
    boot_initrd.py    the initrd for Debian's kernel: its modules in dependency order and boot_init.c's init
    debian_kernel.py  Debian's cloud kernel from its package + that initrd, for boot checks (per-user cache)
    records.py        boot records, which the install commands require
    guest.py          a started guest: lifecycle, guard/fail, waits that follow its progress, evidence, boot.json
    phases.py         one function per phase: kernel root init agent running exec ssh powerdown
    check.py          run a profile: boot_to_ready, run_check, booted, KVM->TCG fallback, `osbuilder boot`

A new way to boot is a new entry in profiles.PROFILES, not new branches in the phases.
"""
