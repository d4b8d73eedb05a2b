"""`egressd loadtest` arguments: a bad one is one line on stderr and exit 2."""

from __future__ import annotations

import pytest

from egressd import cli
from egressd_harness.topology.fleet import DEFAULT_DATAPATH


@pytest.mark.parametrize(
    "argv",
    [
        ["loadtest"],
        ["loadtest", "nope", "--duration", "60"],
        ["loadtest", "steady"],
        ["loadtest", "steady", "--duration", "x"],
        ["loadtest", "steady", "--duration", "-5"],
        ["loadtest", "steady", "--duration", "nan"],
        ["loadtest", "steady", "--duration", "5"],
        ["loadtest", "port-exhaustion", "--duration", "20"],
        ["loadtest", "steady", "--duration", "99999"],
        ["loadtest", "steady", "--duration", "20", "--prefix", "a b-"],
        ["loadtest", "steady", "--duration", "20", "--prefix", "egd-lt"],
        ["loadtest", "steady", "--duration", "20", "--run-dir", "relative"],
        ["loadtest", "steady", "--duration", "20", "--run-dir", "/tmp/a.b"],
        ["loadtest", "steady", "--duration", "20", "--datapath", "ebpf"],
    ],
)
def test_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        code = cli.main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error" in err


def test_options() -> None:
    from egressd_harness.loadtest import cli as lt_cli

    args = cli.build_parser().parse_args(
        [
            "loadtest",
            "port-exhaustion",
            "--duration",
            "45",
            "--prefix",
            "egd-x-",
            "--run-dir",
            "/tmp/lt",
            "--out",
            "o.json",
        ]
    )
    opts = lt_cli.options(args)
    assert (opts.scenario, opts.duration_s, opts.prefix, str(opts.run_dir), str(opts.out)) == (
        "port-exhaustion",
        45.0,
        "egd-x-",
        "/tmp/lt",
        "o.json",
    )


@pytest.mark.parametrize(
    ("extra", "datapath"),
    [
        ([], DEFAULT_DATAPATH),
        (["--datapath", "userspace"], "userspace"),
        (["--datapath", "kernel"], "kernel"),
    ],
)
def test_the_fleets_datapath_is_the_default_unless_asked(extra: list[str], datapath: str) -> None:
    from egressd_harness.loadtest import cli as lt_cli

    args = cli.build_parser().parse_args(["loadtest", "dns-flood", "--duration", "22", *extra])
    assert lt_cli.options(args).datapath == datapath
