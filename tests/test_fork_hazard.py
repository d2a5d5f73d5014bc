"""The warning of CPython's fork deadlock (gh-112275): where it can bite and what it says."""
from train.fork_hazard import fork_hazard


def test_warned_only_with_several_processes_workers_and_an_unfixed_python():
    assert fork_hazard((3, 11, 7), processes=1, workers=8, timeout_s=600) is None  # no process group
    assert fork_hazard((3, 11, 7), processes=2, workers=0, timeout_s=600) is None  # nothing forked
    assert fork_hazard((3, 11, 10), processes=8, workers=8, timeout_s=600) is None  # the fix
    assert fork_hazard((3, 12, 0), processes=8, workers=8, timeout_s=600) is None
    warning = fork_hazard((3, 11, 7), processes=2, workers=2, timeout_s=300)
    assert warning.startswith("warning: Python 3.11.7 ") and "collective_timeout_s=300 s" in warning
    assert fork_hazard((3, 10, 12), processes=2, workers=1, timeout_s=600) is not None
