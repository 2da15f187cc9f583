"""`arbiter bench scale` at a tiny size: the world it writes is what the beat reads, the beat acts on every GPU,
and the accounting (round trips, commands, bytes) is counted. Speed is what the bench reports, never asserted."""

import json
import time

import pytest
import redis
from typer.testing import CliRunner

from arbiter.bench.common import bench_settings
from arbiter.bench.scale import measure_size, verdict
from arbiter.bench.scale_world import GPUS_PER_NODE, populate
from arbiter.world import read
from broker.keys import Keys

pytestmark = pytest.mark.integration


def test_world_is_what_live_workers_write(redis_url):
    settings = bench_settings("arbiter", 1.0).model_copy(update={"redis_url": redis_url,
                                                               "key_prefix": "scaleworld"})
    r = redis.Redis.from_url(redis_url)
    size = populate(r, settings, 9)
    seen = read(r, Keys("scaleworld"), time.time())
    assert size.nodes == 2 and len(seen.gpus) == 9
    for g in seen.gpus:
        assert g.view is not None, f"{g.gpu_id}: no snapshot"
        assert g.view.slots == {"llm": 1, "diffusion": 1}
        assert len(g.view.running) == 2 and len([x for x in g.leases if x.kind == "weights"]) == 2
    assert sum(seen.queued().values()) == size.queued_jobs
    assert len(seen.parked) == size.parked_jobs
    interactive = [g.gpu_id for g in seen.gpus if any(j.priority == "interactive" for j in g.view.running)]
    assert interactive == [f"node{n:03d}:sim0" for n in range(2)]       # each node's first GPU


def test_beat_acts_on_every_gpu_and_traffic_is_counted(tmp_path):
    base = bench_settings("arbiter", 1.0)
    rows = [measure_size(base, n, ticks=5) for n in (1, GPUS_PER_NODE)]
    for row in rows:
        assert row["budgets_written"] == row["gpus"]
        assert row["commands_per_tick"] > 0 and row["bytes_per_tick"] > 0 and row["round_trips_per_tick"] >= 1
        assert row["tick_p50_ms"] > 0 and row["plan_p50_ms"] > 0
        # budgets are written only when they change (the world stays the same from tick to tick), but each
        # node's paused job has its control renewed every tick, in the beat's one apply pipeline
        assert row["commands_by_type_per_tick"]["hset"] >= row["nodes"]
        assert row["sweeps"]["requeue_vanished"]["commands"] > 0 and not row["sweeps_in_loop"]
    assert rows[1]["commands_per_tick"] > rows[0]["commands_per_tick"]
    # one node either way: 8 GPUs cost no more HSETs and no more round trips per tick than 1
    assert rows[1]["commands_by_type_per_tick"]["hset"] - rows[0]["commands_by_type_per_tick"]["hset"] < 1
    assert rows[1]["round_trips_per_tick"] - rows[0]["round_trips_per_tick"] < 1
    v = verdict(rows)
    assert set(v["per_gpu_cost_ratio"]) >= {"tick_p50_ms", "commands_per_tick", "bytes_per_tick"}
    assert v["goals"]["decision_ms_per_job"]["measured"] > 0


def test_cli_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from arbiter.cli import app

    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    result = CliRunner().invoke(app, ["bench", "scale", "--sizes", "1,8", "--ticks", "3", "--workers", "1",
                                      "--burst", "10", "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["gpus"] for r in data["control_plane"]] == [1, 8]
    assert data["dispatch"][0]["jobs_per_s"] > 0 and data["dispatch"][0]["redis_commands_per_job"] > 0
    assert png.stat().st_size > 1000
