"""env.sh: sourcing it works in a `set -u` shell, before and after `make setup`."""

from __future__ import annotations

import shutil
import subprocess

from conftest import REPO_ROOT

ENV_SH = REPO_ROOT / "env.sh"


def _source(folder, shell_opts: str) -> subprocess.CompletedProcess:
    script = (f"{shell_opts}; source {folder}/env.sh; echo rc=$?; "
              "case $- in *u*) echo nounset-kept;; esac; echo end")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_env_sh_before_setup_says_what_to_do_under_set_u(tmp_path):
    shutil.copy(ENV_SH, tmp_path / "env.sh")  # no .venv, no install/ beside it
    res = _source(tmp_path, "set -u")
    assert "unbound variable" not in res.stderr, res.stderr
    assert "run 'make setup'" in res.stderr
    assert "rc=1" in res.stdout and "nounset-kept" in res.stdout and "end" in res.stdout


def test_env_sh_after_setup_keeps_set_u_and_finds_the_node():
    res = _source(REPO_ROOT, "set -u")
    assert res.returncode == 0 and "unbound variable" not in res.stderr, res.stderr
    assert "rc=0" in res.stdout and "nounset-kept" in res.stdout
    res = subprocess.run(["bash", "-c", f"set -u; source {ENV_SH}; command -v internvl_node"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().endswith("internvl_node"), res.stderr
