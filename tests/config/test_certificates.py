"""``engine.config.certificates``: the CA bundle a configuration names is checked when it loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.config.certificates import ca_bundle_problem
from engine.errors import ConfigError
from tests.support.runs import config_for


def test_a_ca_bundle_must_be_a_readable_pem_file(tmp_path: Path, ca_file: Path) -> None:
    assert ca_bundle_problem(str(ca_file)) is None
    assert ca_bundle_problem(str(tmp_path / "nope.pem")) == f"no such file: {tmp_path}/nope.pem"
    assert "is a directory" in (ca_bundle_problem(str(tmp_path)) or "")
    junk = tmp_path / "key.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    assert "holds no PEM certificate" in (ca_bundle_problem(str(junk)) or "")
    unreadable = tmp_path / "locked.pem"
    unreadable.write_bytes(ca_file.read_bytes())
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root reads anything
        assert "cannot read" in (ca_bundle_problem(str(unreadable)) or "")


def test_ca_bundle_is_checked_when_the_config_loads(tmp_path: Path, ca_file: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as info:
        config_for("https://api.example.com/v1", tmp_path, f'teacher.ca_bundle="{missing}"')
    assert info.value.problems == [f"teacher.ca_bundle: no such file: {missing}"]
    config = config_for("https://a.b/v1", tmp_path, f'teacher.ca_bundle="{ca_file}"')
    assert config.teacher.ca_bundle == str(ca_file)
