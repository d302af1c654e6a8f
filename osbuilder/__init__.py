"""osbuilder: build and boot-check guest root filesystems, disk images and kernels for VM-isolated containers."""

__version__ = "0.1.0"
