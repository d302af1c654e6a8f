"""ccache-gcc, the kernel's CC (osbuilder/kernel/ccache-gcc), with the real ccache and gcc in the environment
the kernel build gives them (build.build_env: depend mode): a second source tree of the same sources is
a cache hit, a changed source is not, and a source that `.incbin`s a file always sees that file's
current content (a hit there once put an old kernel inside a new bzImage)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from osbuilder.kernel import build

pytestmark = pytest.mark.skipif(not (shutil.which("ccache") and shutil.which("gcc")),
                                reason="ccache or gcc is not installed (the kernel builds without ccache then)")


@pytest.fixture
def env(osbuilder_settings, tmp_path) -> dict[str, str]:
    """The kernel build's environment, with a ccache of this test's own and a statistics log."""
    kernel_env = build.build_env(osbuilder_settings, SimpleNamespace(epoch=1_700_000_000))  # type: ignore[arg-type]
    return {**os.environ, **kernel_env, "CCACHE_DIR": str(tmp_path / "ccache"),
            "CCACHE_STATSLOG": str(tmp_path / "stats.log")}


def tree(root: Path, source: str, header: str) -> tuple[Path, Path]:
    """A source tree (a.c, include/a.h) and an empty object tree."""
    src, obj = root / "linux", root / "obj"
    (src / "include").mkdir(parents=True)
    (src / "include" / "a.h").write_text(header)
    (src / "a.c").write_text(source)
    obj.mkdir()
    return src, obj


def compile_in(src: Path, obj: Path, env: dict[str, str], source: str = "a.c") -> None:
    """kbuild's way: absolute source and include paths, run in the object tree, a .d file beside; the
    object tree linked to the source tree by the build's own build.link_source."""
    env = dict(env)
    build.link_source(obj, SimpleNamespace(path=src), env)  # type: ignore[arg-type]
    stem = Path(source).stem
    subprocess.run(["bash", str(build.CCACHE_GCC), "gcc", f"-Wp,-MMD,.{stem}.o.d", f"-I{src}/include", "-O2",
                    "-c", "-o", f"{stem}.o", str(src / source)], cwd=obj, env=env, check=True)


def outcomes(env: dict[str, str]) -> list[str]:
    """hit or miss for every compilation so far, in order, from ccache's statistics log."""
    lines = Path(env["CCACHE_STATSLOG"]).read_text().splitlines()
    return [{"direct_cache_hit": "hit", "cache_miss": "miss"}[line] for line in lines
            if line in ("direct_cache_hit", "cache_miss")]


def value_in(obj: Path, section: str = ".data") -> bytes:
    out = subprocess.run(["objcopy", "-O", "binary", "-j", section, str(obj), "/dev/stdout"],
                         check=True, capture_output=True)
    return out.stdout


SOURCE = '#include "a.h"\nint answer = ANSWER;\n'


def test_second_source_tree_is_a_hit_and_a_changed_source_is_not(env, tmp_path):
    first, first_obj = tree(tmp_path / "one", SOURCE, "#define ANSWER 42\n")
    second, second_obj = tree(tmp_path / "two", SOURCE, "#define ANSWER 42\n")
    compile_in(first, first_obj, env)
    compile_in(second, second_obj, env)
    assert outcomes(env) == ["miss", "hit"]
    assert value_in(second_obj / "a.o") == (42).to_bytes(4, "little")

    # a changed source, and a changed header, are compiled again (written beside and renamed, as git does)
    for path, text, answer in ((second / "a.c", SOURCE.replace("ANSWER", "ANSWER + 1"), 43),
                               (second / "include" / "a.h", "#define ANSWER 7\n", 8)):
        path.with_suffix(".new").write_text(text)
        path.with_suffix(".new").rename(path)
        compile_in(second, second_obj, env)
        assert value_in(second_obj / "a.o") == answer.to_bytes(4, "little")
    assert outcomes(env) == ["miss", "hit", "miss", "miss"]


def test_incbin_always_sees_the_current_file(env, tmp_path):
    """piggy.S's shape: the source names a blob and only its size; a new blob of the same size."""
    src, obj = tree(tmp_path, SOURCE, "#define ANSWER 42\n")
    (src / "piggy.S").write_text('.section ".rodata","a",@progbits\nz_input_len = 4\n.incbin "blob.bin"\n')
    for blob in (b"old!", b"new!"):
        (obj / "blob.bin").write_bytes(blob)
        compile_in(src, obj, env, "piggy.S")
        assert value_in(obj / "piggy.o", ".rodata") == blob


def test_outside_an_object_tree_the_compiler_runs_as_it_is(env, tmp_path):
    """objtool's build, the one kbuild runs in the source tree (tools/objtool) with HOSTCC as its CC: no
    .osbuilder-src there, so the source tree's path is not rewritten (an include directory would point
    nowhere) and the compiler runs without ccache, as it did before HOSTCC was ccache-gcc."""
    src, obj = tree(tmp_path, SOURCE, "#define ANSWER 42\n")
    env = dict(env)
    build.link_source(obj, SimpleNamespace(path=src), env)  # type: ignore[arg-type]
    elsewhere = src / "tools"
    elsewhere.mkdir()
    subprocess.run(["bash", str(build.CCACHE_GCC), "gcc", f"-I{src}/include", "-O2", "-c", "-o", str(obj / "t.o"),
                    str(src / "a.c")], cwd=elsewhere, env=env, check=True)
    assert value_in(obj / "t.o") == (42).to_bytes(4, "little")
    assert not Path(env["CCACHE_STATSLOG"]).exists()  # ccache never ran
