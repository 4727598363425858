"""The seam's promises that need no cluster: a local run never imports ray, and a Ray run
without ray installed says what to install."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from engine.distributed import backend
from engine.errors import ConfigError
from engine.pipeline.stats import Stats
from engine.teacher.protocol import Wire
from engine.testing.simulator import RunningSimulator
from tests.support.cli import teacher_env
from tests.support.runs import REPO, SMALL, config_for

# A whole local run in a fresh interpreter; then whether ray was ever imported.
_LOCAL_RUN = """
import asyncio, sys
from engine.config import load_config
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
import engine.cli, engine.distributed.backend  # the CLI, and the seam's own module
config = load_config(sys.argv[1], sys.argv[2:])
asyncio.run(run_job(config, Stats(), preflight=False))
print("ray imported:", "ray" in sys.modules)
"""


async def test_a_local_run_never_imports_ray(sim: RunningSimulator, tmp_path: Path) -> None:
    sets = [*SMALL, f'output.dir="{tmp_path}"', "generation.types=['key_facts_to_qa']"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOCAL_RUN, str(REPO / "config" / "default.toml"),
        *sets,
        cwd=REPO, env=teacher_env(sim.base_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "ray imported: False" in out.decode()
    assert sim.state.total_requests > 0  # it did run


async def test_a_ray_run_without_ray_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    config = config_for("http://127.0.0.1:9/v1", tmp_path, 'run.backend="ray"')
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        async with backend.remote_units(config, Stats(), Wire(), None):
            pass
