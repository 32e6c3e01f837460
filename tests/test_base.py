"""The layer beneath the packages: the error contract every entry point follows, and atomic writes, on real
filesystems (a full tmpfs, a read-only mount)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from base.cli import OneLineParser, positive
from base.errors import EXIT_INTERRUPTED, UsageError, entry_point
from base.files import PARTIAL, append_line, ensure_writable, file_sha256, write_atomic


def test_a_usage_error_is_one_line_and_its_code(capsys: pytest.CaptureFixture) -> None:
    class Refused(UsageError):
        code = 5

    @entry_point("tool")
    def main(argv=None) -> int:
        raise Refused("--x 3: out of range (use 1 or 2)")

    assert main() == 5
    assert capsys.readouterr().err == "tool: error: --x 3: out of range (use 1 or 2)\n"


def test_every_problem_is_its_own_line(capsys: pytest.CaptureFixture) -> None:
    @entry_point("tool")
    def main(argv=None) -> int:
        raise UsageError("--a: bad\n--b: bad too")

    assert main() == 2
    assert capsys.readouterr().err.splitlines() == ["tool: error: --a: bad", "tool: error: --b: bad too"]


def test_argparse_errors_name_the_subcommand(capsys: pytest.CaptureFixture) -> None:
    @entry_point("tool")
    def main(argv=None) -> int:
        p = OneLineParser(prog="tool")
        sub = p.add_subparsers(dest="what", required=True, parser_class=OneLineParser)
        sub.add_parser("run").add_argument("--n", type=positive(int))
        p.parse_args(argv)
        return 0

    assert main(["run", "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "tool run: error: argument --n: must be at least 1, got 0 (see --help)\n"


def test_only_the_first_rank_speaks(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    @entry_point("tool")
    def main(argv=None) -> int:
        raise UsageError("every rank finds this")

    monkeypatch.setenv("RANK", "1")
    assert main() == 2 and capsys.readouterr().err == ""


def test_ctrl_c_is_one_line_and_130(capsys: pytest.CaptureFixture) -> None:
    @entry_point("tool")
    def main(argv=None) -> int:
        raise KeyboardInterrupt

    assert main() == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "tool: interrupted\n"


def test_output_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "tool.py"
    script.write_text("from base.errors import entry_point\n"
                      "@entry_point('tool')\n"
                      "def main(argv=None):\n"
                      "    for i in range(200000):\n"
                      "        print(f'line {i}')\n"
                      "raise SystemExit(main())\n")
    r = subprocess.run(f"{sys.executable} {script} | head -n 2", shell=True, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], env={"PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.stdout == "line 0\nline 1\n" and r.stderr == "", r.stderr


def test_a_bug_keeps_its_traceback() -> None:
    @entry_point("tool")
    def main(argv=None) -> int:
        raise OSError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        main()


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial(small_disk, capsys) -> None:
    disk = small_disk(64)

    @entry_point("tool")
    def main(argv=None) -> int:
        write_atomic(disk / "big.bin", b"x" * 200_000)
        return 0

    assert main() == 2
    err = capsys.readouterr().err
    assert err == (f"tool: error: the disk holding {disk / 'big.bin'} is full (No space left on device): free some "
                   "space and run the same command again\n")
    assert list(disk.iterdir()) == [], "the temp file is removed; nothing half-written remains"


def test_a_failed_rewrite_keeps_the_old_file_whole(small_disk) -> None:
    disk = small_disk(64)
    write_atomic(disk / "a.json", '{"old": true}')
    with pytest.raises(OSError) as e:
        write_atomic(disk / "a.json", b"x" * 200_000)
    assert e.value.errno == errno.ENOSPC
    assert (disk / "a.json").read_text() == '{"old": true}' and sorted(p.name for p in disk.iterdir()) == ["a.json"]


def test_a_read_only_folder_is_one_line(small_disk, capsys: pytest.CaptureFixture) -> None:
    disk = small_disk(64, readonly=True)

    @entry_point("tool")
    def main(argv=None) -> int:
        write_atomic(disk / "r.json", "{}")
        return 0

    assert main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and str(disk) in err
    with pytest.raises(UsageError, match=f"cannot write to --out {disk}: Read-only file system"):
        ensure_writable(disk)


def test_an_append_that_does_not_fit_leaves_the_file_as_it_was(small_disk) -> None:
    disk = small_disk(64)
    append_line(disk / "h.jsonl", '{"n": 1}')
    with pytest.raises(OSError) as e:
        append_line(disk / "h.jsonl", "x" * 200_000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk / "h.jsonl")
    assert (disk / "h.jsonl").read_text() == '{"n": 1}\n', "no half line"
    append_line(disk / "h.jsonl", '{"n": 2}')
    assert (disk / "h.jsonl").read_text().splitlines() == ['{"n": 1}', '{"n": 2}']


def test_write_atomic_takes_text_bytes_and_pieces(tmp_path: Path) -> None:
    write_atomic(tmp_path / "t", "é")
    write_atomic(tmp_path / "b", b"\x00\x01")
    write_atomic(tmp_path / "p", [b"ab", b"cd"])
    assert (tmp_path / "t").read_bytes() == "é".encode() and (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "p").read_bytes() == b"abcd"
    assert file_sha256(tmp_path / "p") == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
    assert not list(tmp_path.glob("*" + PARTIAL))
