"""The guest kernel: source (source.py), config fragments and their verification (config.py),
the out-of-tree build with atomic publish (build.py), CLI handlers (commands.py) and the pytest
`kernel` fixture (fixtures.py). Fragments live in configs/, one concern per file.
"""
