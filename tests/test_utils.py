import os

import pytest

from mdlm_kit.utils import atomic_write, atomic_write_text


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")

    def crash(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half of the new con")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
