"""The rootfs step: `build.py` decides the package set and stages osbuilder's files; distribution
plugins (`distro.py` is their interface, `distros.py` their registry, `debian.py` the first) install
the packages."""
