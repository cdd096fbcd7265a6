"""What the bad-input tests share: a CLI call that must end in one `error:` line and exit 2."""
import pytest


def exits_2(main, argv, capsys) -> str:
    """Run a CLI main, expect exit code 2, return its one-line `error: ...` message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]
