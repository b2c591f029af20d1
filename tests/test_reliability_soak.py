"""The short soak (bench/soak/soak.py runs the long one): RSS and fds flat, nothing left."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.reliability, pytest.mark.soak]

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak" / "soak.py"
SECONDS = float(os.environ.get("TIERQ_SOAK_S", "30"))


@pytest.mark.timeout(SECONDS + 60)
async def test_short_soak_keeps_rss_and_fds_flat_and_leaves_nothing_in_flight(
    tmp_path: Path,
) -> None:
    spec = importlib.util.spec_from_file_location("tierq_soak", SOAK)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = await soak.soak(SECONDS, clients=16, workdir=tmp_path)
    assert result["requests"] > 100
    assert soak.check(result) == [], result
