"""`convert` never loses a model: overlap with the source, two conversions at once, killed conversions, full or
read-only disks (issue 11, items 5-8). Races and kills run as real processes, paused at a chosen stage."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_one_line_error, without_file_override

from bitnet_tt import folders
from bitnet_tt.checkpoint import convert_checkpoint, load_weights
from bitnet_tt.errors import CheckpointError

# Runs `bitnet-tt ARGS` after making one step of the conversion wait, once reached, until FLAGS/go exists:
# "load" before the source is read, "written" after the tensor file is written, "publish" before the final rename.
PAUSED_CLI = r"""
import os, pathlib, sys, time
import bitnet_tt.checkpoint as checkpoint
from bitnet_tt.cli import main

stage, flags = sys.argv[1], pathlib.Path(sys.argv[2])
step = {"load": "load_weights", "written": "write_safetensors", "publish": "publish"}[stage]
original = getattr(checkpoint, step)

def pause():
    (flags / f"reached-{os.getpid()}").touch()
    while not (flags / "go").exists():
        time.sleep(0.02)

def paused(*args, **kwargs):
    if stage == "written":
        original(*args, **kwargs)
        return pause()
    pause()
    return original(*args, **kwargs)

setattr(checkpoint, step, paused)
sys.exit(main(sys.argv[3:]))
"""


def start_paused(stage: str, flags, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PAUSED_CLI, stage, str(flags), "convert", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_paused(flags, processes) -> None:
    while len(list(flags.glob("reached-*"))) < len(processes):
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"the conversion ended before its pause: {process.communicate()[1]}")
        time.sleep(0.05)


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def partials(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


@pytest.fixture
def flags(tmp_path):
    (tmp_path / "flags").mkdir()
    return tmp_path / "flags"


# ---------------------------------------------------------------------------------------------
# Item 5: the destination may neither lie inside the source nor contain it


def test_force_refuses_a_destination_that_holds_the_source(model_factory, tmp_path):
    wrap = convert_checkpoint(model_factory("packed", seed=1), tmp_path / "wrap", progress=False)
    src = shutil.copytree(model_factory("packed"), wrap / "src_model")
    before = digest(src)
    (tmp_path / "link").symlink_to(wrap)
    for source, destination in [(src, wrap), (tmp_path / "link" / "src_model", wrap), (src, tmp_path / "link"),
                                (wrap, src / "inner"), (src, src)]:
        with pytest.raises(CheckpointError, match="overlaps the source"):
            convert_checkpoint(source, destination, force=True, progress=False)
    assert digest(src) == before


def test_force_refuses_a_destination_that_holds_the_files_a_source_links_to(model_factory, tmp_path):
    """A hub snapshot: the folder holds links into the cache's blob store."""
    blobs = convert_checkpoint(model_factory("packed", seed=1), tmp_path / "blobs", progress=False)
    model = model_factory("packed")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in model.iterdir():
        shutil.copyfile(path, blobs / f"blob-{path.name}")
        (snapshot / path.name).symlink_to(blobs / f"blob-{path.name}")
    with pytest.raises(CheckpointError, match="overlaps the source"):
        convert_checkpoint(snapshot, blobs, force=True, progress=False)
    assert load_weights(snapshot, progress=False).source_format == "packed"


# ---------------------------------------------------------------------------------------------
# Item 6: two conversions to one destination at once


@pytest.mark.parametrize("force", [False, True], ids=["exclusive", "force"])
def test_two_conversions_race_to_one_destination(model_factory, tmp_path, flags, force):
    sources = [model_factory("packed"), model_factory("packed", seed=1)]
    expected = [digest(convert_checkpoint(s, tmp_path / f"alone-{i}", progress=False)) for i, s in enumerate(sources)]
    dst = tmp_path / "out"
    if force:
        convert_checkpoint(model_factory("master"), dst, progress=False)
    runs = [start_paused("publish", flags, s, dst, *(["--force"] if force else [])) for s in sources]
    wait_until_paused(flags, runs)  # both have checked the destination and written their model
    (flags / "go").touch()
    results = [(run.wait(), run.communicate()[1]) for run in runs]
    winners = [code for code, _ in results if code == 0]
    assert len(winners) == (2 if force else 1), results
    for code, stderr in results:
        if code:
            assert_one_line_error(code, stderr, "already exists (another conversion finished first?)")
    assert digest(dst) in expected  # one whole conversion, not a mixture
    assert partials(tmp_path) == []
    load_weights(dst, progress=False)  # and its checksums hold


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "lock"])
def test_publish_is_exclusive_or_swaps(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(folders, "_renameat2", None)
    elif folders._renameat2 is None:
        pytest.skip("this system has no renameat2")

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
        return tmp_path / name

    dst = tmp_path / "dst"
    folders.publish(folder("a", "first"), dst)
    assert (dst / "f").read_text() == "first" and not (tmp_path / "a").exists()
    with pytest.raises(FileExistsError):
        folders.publish(folder("b", "second"), dst)
    with pytest.raises(FileExistsError):
        folders.publish(tmp_path / "b", dst, replaceable=lambda old: False)
    assert (dst / "f").read_text() == "first" and (tmp_path / "b" / "f").read_text() == "second"
    folders.publish(tmp_path / "b", dst, replaceable=lambda old: (old / "f").read_text() == "first")
    assert (dst / "f").read_text() == "second" and (tmp_path / "b" / "f").read_text() == "first"  # swapped


# ---------------------------------------------------------------------------------------------
# Item 7: killed conversions leave nothing behind, or the next conversion removes it


@pytest.mark.parametrize("stage, signum", [
    ("written", signal.SIGTERM),
    ("publish", signal.SIGKILL),
    pytest.param("load", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("publish", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("written", signal.SIGHUP, marks=pytest.mark.slow),
    pytest.param("load", signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("written", signal.SIGKILL, marks=pytest.mark.slow),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_killed_conversion(model_factory, tmp_path, flags, stage, signum):
    src = model_factory("packed")
    dst = convert_checkpoint(model_factory("packed", seed=1), tmp_path / "out", progress=False)  # an earlier one
    before = digest(dst)
    run = start_paused(stage, flags, src, dst, "--force")
    wait_until_paused(flags, [run])
    under_way = partials(tmp_path)
    assert bool(under_way) == (stage != "load")
    run.send_signal(signum)
    _, stderr = run.communicate()
    assert digest(dst) == before  # the earlier conversion is still there, whole
    if signum == signal.SIGKILL:
        assert run.returncode == -signal.SIGKILL and partials(tmp_path) == under_way
        convert_checkpoint(src, dst, force=True, progress=False)  # removes what the killed conversion left
        assert digest(dst) != before
    else:
        assert run.returncode == 128 + signum
        assert stderr.strip() == f"bitnet-tt: terminated by {signum.name}"
    assert partials(tmp_path) == []


def test_stale_partials_are_told_from_live_ones(tmp_path):
    dst = tmp_path / "out"
    ended = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ended_tag = folders.process_tag(ended.pid)
    ended.communicate(b"")
    live_tag = folders.process_tag(os.getpid())
    boot, pid, start = live_tag.split("-")
    names = {
        "dead": f".out.partial-{ended_tag}",
        "reused pid": f".out.partial-{boot}-{pid}-{int(start) + 1}",
        "old boot": f".out.partial-{'1' if boot == '0' else '0'}-{pid}-{start}",
        "live": f".out.partial-{live_tag}",
        "not ours": ".out.partial-mine",
        "other model": f".other.partial-{ended_tag}",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    removed = folders.remove_stale_partials(dst)
    assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead", "reused pid", "old boot"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("live", "not ours", "other model"))


# ---------------------------------------------------------------------------------------------
# Item 8: a full disk, a read-only filesystem, an unwritable parent


def in_own_mount_namespace(script: str, *args) -> subprocess.CompletedProcess:
    """`sh -c script args` as root of a new user and mount namespace (a tmpfs mount needs no privilege there)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                    capture_output=True).returncode:
        pytest.skip("this machine cannot make a user and mount namespace, so cannot mount a small filesystem")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mount_options, message", [
    ("size=32k", "cannot write the converted model (No space left on device)"),  # the tensors do not fit
    ("size=1m,ro", "cannot write the converted model (Read-only file system)"),
])
def test_a_full_or_read_only_filesystem(model_factory, tmp_path, mount_options, message):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; "$3" -m bitnet_tt.cli convert "$4" "$2/out" --quiet; '
              'code=$?; ls -A "$2"; exit $code')
    result = in_own_mount_namespace(script, mount_options, disk, sys.executable, model_factory("packed"))
    assert result.returncode != 99, result.stderr
    assert_one_line_error(result.returncode, result.stderr, message)
    assert result.stdout == ""  # no partial folder, no half-written model


def test_an_unwritable_parent(model_factory, tmp_path):
    prefix = without_file_override()
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    result = subprocess.run([*prefix, sys.executable, "-m", "bitnet_tt.cli", "convert", str(model_factory("packed")),
                             str(parent / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, "cannot write the converted model (Permission denied)")
    assert list(parent.iterdir()) == []
