"""The guest kernel: its source (source.py), the general Kconfig model (kconfig.py), osbuilder's config
fragments and their verification (fragments.py), and the out-of-tree build with atomic publish
(build.py). Fragments live in configs/, one concern per file. The CLI handlers are in osbuilder/cli.py,
the `kernel` fixture in osbuilder/pytest_plugin.py.
"""
