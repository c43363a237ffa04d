"""The fused LoRA kernel's guards (issue 15 item 2): every bad input is a TypeError/ValueError raised before C sees a
pointer (also under `python -O`), the build runs with -Wall -Werror, and a cached library is loaded only if its bytes
are the ones its build recorded."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from adaptery.engine import lora_kernel

ROOT = Path(__file__).resolve().parents[2]
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler here")


class NoC:
    """A library whose entry point fails the test if it is reached."""

    def lora_site(self, *args):  # noqa: ANN002, ANN201
        raise AssertionError("a pointer reached C")

    lora_site_bound = lora_site


def _good() -> dict:
    """A valid call: 3 rows (one skipped), 2 slots of rank 2 and 1 (max 4), 2 projections of 3 + 2 columns."""
    shrink = torch.randn(2, 4, 2, 5)
    expand = torch.randn(2, 4, 5)
    return {
        "x": torch.randn(3, 5),
        "out": torch.zeros(3, 5),
        "slots": torch.tensor([0, -1, 1], dtype=torch.int32),
        "ranks": torch.tensor([2, 1], dtype=torch.int32),
        "shrink": lora_kernel.addresses(shrink),
        "expand": lora_kernel.addresses(expand),
        "offsets": torch.tensor([0, 3, 5], dtype=torch.int64),
        "max_rank": 4,
        "weights": torch.float32,
        "_keep": (shrink, expand),
    }


BAD = {
    "x float16": (TypeError, "x must be", lambda a: a.update(x=a["x"].half())),
    "out dtype unlike x": (TypeError, "out must be", lambda a: a.update(out=a["out"].bfloat16())),
    "x not a tensor": (TypeError, "x must be a torch.Tensor", lambda a: a.update(x=a["x"].tolist())),
    "x columns strided": (ValueError, "x must be contiguous", lambda a: a.update(x=torch.randn(5, 3).t())),
    "x 3-d": (ValueError, "x must have 2", lambda a: a.update(x=a["x"][None])),
    "out too narrow": (ValueError, "out must be", lambda a: a.update(out=torch.zeros(3, 4))),
    "out rows too few": (ValueError, "out must be", lambda a: a.update(out=torch.zeros(2, 5))),
    "out rows overlap": (ValueError, "must not overlap", lambda a: a.update(out=torch.zeros(5).expand(3, 5))),
    "slots int64": (TypeError, "slots must be", lambda a: a.update(slots=a["slots"].long())),
    "slots too few": (ValueError, "slots has 2 entries", lambda a: a.update(slots=a["slots"][:2])),
    "slot index out of range": (ValueError, "slot index 2 is out of range", lambda a: a["slots"].fill_(2)),
    "rank above max_rank": (ValueError, "ranks must lie in", lambda a: a["ranks"].fill_(5)),
    "negative rank": (ValueError, "ranks must lie in", lambda a: a["ranks"].fill_(-1)),
    "ranks float": (TypeError, "ranks must be", lambda a: a.update(ranks=a["ranks"].float())),
    "shrink addresses int32": (TypeError, "shrink must be", lambda a: a.update(shrink=a["shrink"].int())),
    "an address short": (ValueError, "one address per slot", lambda a: a.update(expand=a["expand"][:1])),
    "a null address in use": (ValueError, "no shrink/expand address", lambda a: a["shrink"].zero_()),
    "offsets decreasing": (ValueError, "never decrease", lambda a: a.update(offsets=torch.tensor([0, 6, 5]))),
    "offsets from 1": (ValueError, "start at 0", lambda a: a.update(offsets=torch.tensor([1, 3, 5]))),
    "max_rank zero": (ValueError, "max_rank must be", lambda a: a.update(max_rank=0)),
    "weights float16": (TypeError, "weights must be", lambda a: a.update(weights=torch.float16)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_raises_before_c(case):
    error, message, spoil = BAD[case]
    args = _good()
    spoil(args)
    args.pop("_keep")
    with pytest.raises(error, match=message):
        lora_kernel.site(NoC(), **args)


def test_the_good_call_reaches_c():
    args = _good()
    args.pop("_keep")
    with pytest.raises(AssertionError, match="a pointer reached C"):
        lora_kernel.site(NoC(), **args)


def test_addresses_refuses_a_non_contiguous_tensor():
    with pytest.raises(ValueError, match="contiguous"):
        lora_kernel.addresses(torch.randn(4, 6)[:, ::2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        lora_kernel.addresses([1, 2])


def test_the_checks_hold_under_python_O():
    """asserts vanish under -O: these checks are real exceptions, so the bad calls still raise there."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
assert False, "this line proves -O is on"
from test_lora_kernel_safety import BAD, NoC, _good
from adaptery.engine import lora_kernel
for case in ["slot index out of range", "rank above max_rank", "x columns strided", "x float16"]:
    error, message, spoil = BAD[case]
    args = _good(); spoil(args); args.pop("_keep")
    try:
        lora_kernel.site(NoC(), **args)
    except error as exc:
        assert False  # stripped: only the print below reports
        print("raised", case, exc)
    else:
        print("NOT RAISED", case)
"""
    result = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("raised ") == 4 and "NOT RAISED" not in result.stdout, result.stdout


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "kernels"
    monkeypatch.setattr(lora_kernel, "_loaded", {})
    monkeypatch.setenv("ADAPTERY_KERNEL_CACHE", str(cache))
    monkeypatch.delenv("ADAPTERY_LORA_KERNEL", raising=False)
    return cache


@needs_gcc
def test_the_build_runs_with_wall_werror(fresh_cache, tmp_path, monkeypatch):
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {shutil.which("gcc")} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.delenv("ADAPTERY_CC", raising=False)
    assert lora_kernel.load(portable=True) is not None
    builds = [line.split() for line in log.read_text().splitlines() if "-o" in line.split()]
    assert builds and all({"-Wall", "-Werror"} <= set(args) for args in builds)


@needs_gcc
@pytest.mark.parametrize("portable", [False, True])
def test_the_packaged_source_compiles_without_a_warning(tmp_path, portable):
    flags = lora_kernel.PORTABLE_FLAGS if portable else lora_kernel.FLAGS
    assert "-Wall" in flags and "-Werror" in flags
    source = tmp_path / "kernels.c"
    source.write_text(lora_kernel.SOURCE, encoding="utf-8")  # every file of SOURCE_FILES, as built
    result = subprocess.run(["gcc", *flags, "-Wextra", "-Wno-unused-parameter", str(source), "-o",
                             str(tmp_path / "k.so")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_c_source_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "engine/*.c" in config["tool"]["setuptools"]["package-data"]["adaptery"]
    here = Path(lora_kernel.__file__).parent
    assert lora_kernel.SOURCE_FILES == ("lora_kernel.c", "step_ops.c", "paged_attention.c")
    texts = [(here / name).read_text(encoding="utf-8") for name in lora_kernel.SOURCE_FILES]
    assert "\n".join(texts) == lora_kernel.SOURCE


def _impostor(path: Path, tmp_path: Path) -> Path:
    """A library with the kernel's entry points (lora_tile_rows says 99) that leaves a file behind the moment it is
    loaded (a constructor: dlopen runs it before any symbol is looked up). Returns that file's path."""
    marker = tmp_path / "impostor-ran"
    source = tmp_path / "impostor.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void ran(void) "
        f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
        "int lora_tile_rows(void) { return 99; }\nvoid lora_site(void) {}\n"
    )
    subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(path)], check=True, timeout=60)
    return marker


@needs_gcc
@pytest.mark.parametrize("recorded", ["kept", "missing"])
def test_a_tampered_cached_library_is_rebuilt_not_loaded(fresh_cache, tmp_path, monkeypatch, recorded):
    """The cached .so is swapped for another library, its recorded hash kept or deleted (an altered cache, or one
    from before hashes were recorded): load() rebuilds it and never runs the impostor. (Whoever can rewrite both
    files could as well rewrite the package: the hash catches stale and damaged caches, not that.)"""
    impostor = tmp_path / "impostor.so"
    marker = _impostor(impostor, tmp_path)
    assert lora_kernel.load(portable=True) is not None
    [cached] = fresh_cache.glob("lora_kernel-*.so")
    shutil.copyfile(impostor, cached)
    hash_file = cached.with_name(cached.name + ".sha256")
    if recorded == "missing":
        hash_file.unlink()
    monkeypatch.setattr(lora_kernel, "_loaded", {})
    library = lora_kernel.load(portable=True)
    assert not marker.exists()  # the impostor never ran
    assert library is not None and library.lora_tile_rows() == 1  # the portable build's, not the impostor's 99
    rebuilt = cached.read_bytes()
    assert rebuilt != impostor.read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == hash_file.read_text().strip()  # rebuilt in place, hash recorded


@needs_gcc
def test_the_cache_name_covers_source_flags_and_compiler(fresh_cache, monkeypatch):
    assert lora_kernel.load(portable=True) is not None
    first = {p.name for p in fresh_cache.glob("*.so")}
    monkeypatch.setattr(lora_kernel, "_loaded", {})
    monkeypatch.setattr(lora_kernel, "_compiler_version", lambda compiler: "gcc (another) 99.0")
    assert lora_kernel.load(portable=True) is not None
    assert len({p.name for p in fresh_cache.glob("*.so")} - first) == 1  # a new compiler: a new library
    monkeypatch.setattr(lora_kernel, "_loaded", {})
    monkeypatch.setattr(lora_kernel, "SOURCE", lora_kernel.SOURCE + "\n/* changed */\n")
    assert lora_kernel.load(portable=True) is not None
    assert len(list(fresh_cache.glob("*.so"))) == 3


def test_no_compiler_falls_back_once(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", os.devnull + "/missing-cc")
    assert lora_kernel.load(portable=True) is None


def _table(args: dict) -> lora_kernel.SiteTable:
    """The engine's path: the same call's table, for one layer."""
    return lora_kernel.SiteTable(
        args["ranks"], args["shrink"][None], args["expand"][None], args["offsets"], args["max_rank"], args["weights"]
    )


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_raises_before_c_through_a_site_table(case):
    error, message, spoil = BAD[case]
    args = _good()
    spoil(args)
    with pytest.raises(error, match=message):
        _table(args).run(NoC(), 0, args["x"], args["out"], args["slots"])


@pytest.mark.parametrize("spoil", ["rank above max_rank", "a null address in use", "slot index out of range"])
def test_a_site_table_checks_again_after_a_write_to_it(spoil):
    """Checked once when made: an in-place write afterwards (torch counts it) is checked on the next call."""
    args = _good()
    table = _table(args)
    with pytest.raises(AssertionError, match="a pointer reached C"):
        table.run(NoC(), 0, args["x"], args["out"], args["slots"])
    error, message, change = BAD[spoil]
    if spoil == "a null address in use":
        table.shrink[0, 1] = 0  # the table's own row of addresses, as SlotBuffers writes it
    else:
        change(args)
    with pytest.raises(error, match=message):
        table.run(NoC(), 0, args["x"], args["out"], args["slots"])
    with pytest.raises(error, match=message):  # and stays refused: a failed check is not remembered as passed
        table.run(NoC(), 0, args["x"], args["out"], args["slots"])


def test_a_site_table_is_checked_once_not_per_call(monkeypatch):
    args = _good()
    table = _table(args)
    checks = []
    monkeypatch.setattr(table, "check", lambda: checks.append(1))
    reads = []
    numpy = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: reads.append(1) or numpy(self, *a, **k))
    for _ in range(5):
        with pytest.raises(AssertionError, match="a pointer reached C"):
            table.run(NoC(), 0, args["x"], args["out"], args["slots"])
    assert checks == [] and len(reads) == 1  # the slots' bounds, read once for this slots tensor
    with pytest.raises(ValueError, match="layer must be"):
        table.run(NoC(), 1, args["x"], args["out"], args["slots"])


def test_a_site_table_of_inference_tensors_is_checked_on_every_call():
    """Tensors made under torch.inference_mode count no writes: nothing about them may be remembered as checked."""
    with torch.inference_mode():
        args = _good()
        table = _table(args)
        with pytest.raises(AssertionError, match="a pointer reached C"):
            table.run(NoC(), 0, args["x"], args["out"], args["slots"])
        args["slots"].fill_(2)
        with pytest.raises(ValueError, match="slot index 2 is out of range"):
            table.run(NoC(), 0, args["x"], args["out"], args["slots"])
        args["slots"].fill_(0)
        args["ranks"].fill_(5)
        with pytest.raises(ValueError, match="ranks must lie in"):
            table.run(NoC(), 0, args["x"], args["out"], args["slots"])


def _bound(args: dict, library: object = None, skip: int = 0) -> lora_kernel.BoundSite:
    """The engine's path since binding: the table bound to the step's slots, then one call a layer."""
    x = args["x"]
    dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float32
    return _table(args).bind(library or NoC(), args["slots"], skip, dtype, 5)


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_raises_before_c_through_a_bound_site(case):
    """What the table and the slots get wrong is refused when binding, what a call brings (x, out) at the call:
    either way before a pointer reaches C (NoC's entry points fail the test with an AssertionError)."""
    error, _, spoil = BAD[case]
    args = _good()
    spoil(args)
    with pytest.raises(error):
        _bound(args)(0, args["x"], args["out"])


def test_the_good_bound_call_reaches_c():
    args = _good()
    with pytest.raises(AssertionError, match="a pointer reached C"):
        _bound(args)(0, args["x"], args["out"])


@pytest.mark.parametrize("write", ["table address", "table rank", "slots"])
def test_a_write_after_binding_is_refused_not_read(write):
    """A bound site packed the table's and the slots' addresses and bounds: any write torch counts after that (a slot
    moved in, a slot index changed) makes every later call refuse, until bound again (which checks it)."""
    args = _good()
    table = _table(args)
    bound = table.bind(NoC(), args["slots"], 0, torch.float32, 5)
    if write == "table address":
        table.shrink[0, 1] = 0
    elif write == "table rank":
        table.ranks[1] = 1  # even a harmless value: the bound block is stale
    else:
        args["slots"][0] = 1
    for _ in range(2):
        with pytest.raises(ValueError, match="written after binding"):
            bound(0, args["x"], args["out"])
    if write == "table address":
        with pytest.raises(ValueError, match="no shrink/expand address"):
            table.bind(NoC(), args["slots"], 0, torch.float32, 5)


def test_binding_refuses_inference_tensors_and_bad_layers():
    args = _good()
    with torch.inference_mode():
        slots = args["slots"].clone()
    with pytest.raises(ValueError, match="count their writes"):
        _table(args).bind(NoC(), slots, 0, torch.float32, 5)
    bound = _bound(args)
    for layer in (-1, 1, True, 0.0):
        with pytest.raises(ValueError, match="layer must be"):
            bound(layer, args["x"], args["out"])
    for skip, d_in in ((-1, 5), (True, 5), (0, 0)):
        with pytest.raises(ValueError, match="skip must be|d_in must be"):
            _table(args).bind(NoC(), args["slots"], skip, torch.float32, d_in)
    with pytest.raises(TypeError, match="must be torch.float32 or torch.bfloat16"):
        _table(args).bind(NoC(), args["slots"], 0, torch.float16, 5)
    with pytest.raises(ValueError, match="as bound"):  # the rows it was bound for, base rows included
        _bound(args, skip=1)(0, args["x"], args["out"])


@needs_gcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bound_call_computes_what_the_checked_call_computes(dtype):
    """Same table, same rows: the bound call (base rows skipped by address) writes exactly what `run` writes on the
    rows after them, and leaves the base rows untouched."""
    library = lora_kernel.load()
    if library is None:
        pytest.skip("the kernel does not build here")
    torch.manual_seed(0)
    layers, slots_n, rank, d_in, outs = 2, 3, 4, 40, [24, 8]
    shrink = torch.randn(layers, slots_n, rank, 2, d_in)
    expand = torch.randn(layers, slots_n, rank, sum(outs))
    table = lora_kernel.SiteTable(
        torch.tensor([4, 2, 3], dtype=torch.int32),
        torch.stack([lora_kernel.addresses(shrink[layer]) for layer in range(layers)]),
        torch.stack([lora_kernel.addresses(expand[layer]) for layer in range(layers)]),
        torch.tensor([0, 24, 32], dtype=torch.int64), rank, torch.float32,
    )  # fmt: skip
    slots = torch.tensor([0, 0, 2, -1, 1, 1, 1], dtype=torch.int32)
    skip = 3
    x = torch.randn(skip + len(slots), d_in).to(dtype)
    start = torch.randn(skip + len(slots), sum(outs)).to(dtype)
    checked, bound = start.clone(), start.clone()
    table.run(library, 1, x[skip:], checked[skip:], slots)
    table.bind(library, slots, skip, dtype, d_in)(1, x, bound)
    assert torch.equal(bound, checked)
    assert torch.equal(bound[:skip], start[:skip]) and not torch.equal(bound[skip:], start[skip:])


def _bad_conversions() -> dict:
    import numpy as np

    source, target = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.uint16)
    return {
        "a tensor, not an array": (torch.zeros(2, 3), False, target),
        "float64": (source.astype(np.float64), False, target),
        "three dimensions": (source[None], False, target),
        "shapes differ": (source, False, np.zeros((3, 2), np.uint16)),
        "bf16 flag on float32": (source, True, target),
        "float32 flag on uint16": (target.copy(), False, target),
        "target rows not contiguous": (source, False, np.zeros((2, 6), np.uint16)[:, ::2]),
        "read-only target": (source, False, np.frombuffer(bytes(12), np.uint16).reshape(2, 3)),
        "strides of half an element": (np.lib.stride_tricks.as_strided(source, (2, 3), (6, 2)), False, target),
    }


@pytest.mark.parametrize("case", list(_bad_conversions()))
def test_convert_weights_refuses_what_it_cannot_write_safely(case):
    """Every bad call to `convert_weights` (the loader's conversion into an adapter's tensors) is a TypeError or
    ValueError before C sees a pointer."""
    source, bf16, target = _bad_conversions()[case]
    with pytest.raises((TypeError, ValueError)):
        lora_kernel.convert_weights(NoC(), source, bf16, target)
