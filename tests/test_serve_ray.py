"""`kiln serve --ray` on a local Ray (this machine's 2 CPUs), and `kiln loadtest`.

One Ray server (tiny SD1 and BLIP, two replicas) runs for the module; the tests use it in
file order: both replicas answer, the image equals the single-process server's, a bounded
Locust run holds, one replica is killed and comes back, SIGTERM stops it all.
"""

import base64
import importlib.util
import io
import json
import os
import re
import signal
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from cli_helpers import assert_user_error, run_kiln
from PIL import Image
from serve_helpers import Server

from kiln.serve.loadtest import LoadOptions, _locust
from kiln.serve.ray_app import RaySettings, deployment_options, parse_autoscale
from kiln.serve.settings import ServeSettings

pytest.importorskip("ray", reason="the Ray tests need the ray extra (bash scripts/install.sh dev)")
# Never imported here: Locust monkey-patches the process it is imported in (gevent).
if importlib.util.find_spec("locust") is None:
    pytest.skip("the load tests need the loadtest extra (locust)", allow_module_level=True)

TXT2IMG = {"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 7}
GRACE = 20
# A Ray cluster with two warm replicas takes minutes on 2 cores: CI runs these after the
# default suite (`pytest -m slow`), which stays under its time budget without them.
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_server(artifacts, served_blip):
    running = Server(
        [artifacts["sd1"], served_blip["blip"]],
        "--ray",
        "--replicas",
        "2",
        "--max-queue",
        "4",
        "--grace",
        str(GRACE),
        ready_timeout=300,
    )
    _wait_for_replicas(running, 2)
    running.tree = psutil.Process(running.process.pid).children(recursive=True)
    yield running
    running.stop()


def _wait_for_replicas(server, count, timeout=180):
    """/readyz answers once one replica is up; the others may still be loading their models."""
    deadline = time.monotonic() + timeout
    pids = set()
    while time.monotonic() < deadline:
        pids = {r["replica"]["pid"] for r in _replicas(server)}
        if len(pids) == count:
            return
        time.sleep(1)
    raise AssertionError(f"{count} replicas not all up in {timeout} s: {pids}")


def _replicas(server):
    with server.client() as client:
        return client.get("/v1/plan").json()["replicas"]


def _image(answer):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))


@SLOW
def test_both_replicas_answer_and_plan_for_their_node(ray_server):
    replicas = _replicas(ray_server)
    assert len({r["replica"]["pid"] for r in replicas}) == 2
    for report in replicas:
        assert set(report["models"]) == {"sd1", "blip-captions"}
        unet = [c for c in report["models"]["sd1"]["components"] if c["component"] == "unet"]
        assert unet[0]["variant"] == "unet/onnx/fp32" and unet[0]["reason"]
    served_by = set()
    with ray_server.client() as client:
        for _ in range(40):
            answer = client.post("/sdapi/v1/txt2img", json={**TXT2IMG, "steps": 1})
            assert answer.status_code == 200
            served_by.add(answer.headers["x-kiln-served-by"])
            if len(served_by) == 2:
                break
    assert len(served_by) == 2, served_by


@SLOW
def test_ray_and_single_process_servers_give_the_same_image(ray_server, artifacts):
    with ray_server.client() as client:
        from_ray = _image(client.post("/sdapi/v1/txt2img", json=TXT2IMG))
    single = Server([artifacts["sd1"]])
    try:
        with single.client() as client:
            from_single = _image(client.post("/sdapi/v1/txt2img", json=TXT2IMG))
    finally:
        assert single.stop() == 0
    assert np.array_equal(from_ray, from_single)


@SLOW
def test_metrics_answer_for_every_replica(ray_server):
    with ray_server.client() as client:
        text = client.get("/metrics").text
    replicas = set(re.findall(r'kiln_process_rss_bytes\{replica="([^"]+)"\}', text))
    assert len(replicas) == 2, text[:500]


@SLOW
def test_a_bounded_locust_run_ends_in_success_or_429_and_memory_holds(ray_server):
    options = LoadOptions(users=6, mix="txt2img=2,caption=2,openai=1", timeout=60)
    pids = [r["replica"]["pid"] for r in _replicas(ray_server)]
    _locust(ray_server.url, options, 3)  # warm-up
    warm = {pid: psutil.Process(pid).memory_info().rss for pid in pids}
    report = _locust(ray_server.url, options, 8)
    assert set(report) == {"txt2img", "caption", "openai"}
    for name, figures in report.items():
        codes = {int(code) for code in figures["statuses"]}
        assert codes and all(code == 200 or 400 <= code < 500 for code in codes), (name, figures)
        assert figures["statuses"].get("200", 0) > 0, (name, figures)
        assert figures["max_ms"] < options.timeout * 1000
    for pid in pids:
        after = psutil.Process(pid).memory_info().rss
        assert after <= warm[pid] * 1.10, (pid, warm[pid], after)


@SLOW
def test_a_killed_replica_loses_only_its_requests_and_comes_back(ray_server):
    before = [r["replica"]["pid"] for r in _replicas(ray_server)]
    slow = {**TXT2IMG, "steps": 60}
    in_flight = []

    def send():
        with ray_server.client() as client:
            in_flight.append(client.post("/sdapi/v1/txt2img", json=slow).status_code)

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    time.sleep(0.5)
    os.kill(before[0], signal.SIGKILL)
    killed = time.monotonic()
    for sender in senders:
        sender.join(120)
    assert all(code == 200 or code >= 500 for code in in_flight), in_flight
    lost = sum(code >= 500 for code in in_flight)
    with ray_server.client() as client:
        after_kill = [client.post("/sdapi/v1/txt2img", json=TXT2IMG).status_code for _ in range(8)]
    assert after_kill == [200] * 8
    while time.monotonic() - killed < 120:
        now = [r["replica"]["pid"] for r in _replicas(ray_server)]
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Ray did not replace replica {before[0]} in 120 s: {now}")
    if lost:  # Ray's proxy counts the requests the killed replica dropped
        assert _ray_errors(ray_server) >= lost


def _ray_errors(server, timeout=60):
    """5xx answers of the txt2img route in Ray's own metrics (exported every few seconds)."""
    url = re.search(r"Ray's metrics \(ray_serve_\*\) at (\S+)", server.output()).group(1)
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        count = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ray_serve_num_http_requests_total")
            and 'route="/sdapi/v1/txt2img"' in line
            and re.search(r'status_code="5\d\d"', line)
        )
        if count:
            return count
        time.sleep(2)
    return count


@SLOW
def test_sigterm_stops_the_ray_server_in_its_grace_period_and_leaves_no_ray_process(
    ray_server,
):
    tree = ray_server.tree + psutil.Process(ray_server.process.pid).children(recursive=True)
    started = time.monotonic()
    assert ray_server.stop(signal.SIGTERM, timeout=GRACE + 30) == 0, ray_server.output()[-2000:]
    assert time.monotonic() - started < GRACE
    _, alive = psutil.wait_procs(tree, timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]


# ---------------------------------------------------------------- options, errors, CLI


def test_deployment_options_follow_the_flags():
    settings = ServeSettings(max_queue=6, grace=12)
    fixed = deployment_options(settings, RaySettings(replicas=3, replica_cpus=2, replica_gpus=0.5))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert fixed["max_queued_requests"] == 6 and fixed["max_ongoing_requests"] == 7
    assert fixed["graceful_shutdown_timeout_s"] == 12
    scaled = deployment_options(settings, RaySettings(autoscale=parse_autoscale("1:4")))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 1
    assert scaled["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "2"], "--replicas, --autoscale and --ray-address need --ray"),
        (["--ray", "--replicas", "2", "--autoscale", "1:2"], "pass --replicas or --autoscale"),
        (["--ray", "--autoscale", "3:1"], "--autoscale 3:1: needs 0 <= MIN <= MAX"),
        (["--ray", "--autoscale", "many"], "expected MIN:MAX"),
    ],
)
def test_ray_flags_refused_in_one_line(artifacts, flags, message):
    assert_user_error(run_kiln("serve", artifacts["sd1"], *flags), message)


@SLOW
def test_loadtest_command_prints_the_figures_and_writes_them(artifacts, served_blip, tmp_path):
    out = tmp_path / "load.json"
    result = run_kiln(
        "loadtest",
        artifacts["sd1"],
        served_blip["blip"],
        *("--run-time", 5, "--warmup", 2, "--users", 4, "--max-queue", 2, "--json", out),
    )
    assert result.returncode == 0, result.stderr
    assert "served/s" in result.stdout and "SIGTERM stopped it" in result.stdout
    run = json.loads(out.read_text())["runs"][0]
    assert run["setup"] == "single" and run["exit_code"] == 0
    assert set(run["endpoints"]) == {"txt2img", "caption", "openai"}
    assert all(e["statuses"].get("200", 0) > 0 for e in run["endpoints"].values())


def test_loadtest_refuses_an_unknown_server_setup_or_mix(artifacts):
    result = run_kiln("loadtest", artifacts["sd1"], "--server", "ray")
    assert_user_error(result, "expected single or ray:N")
    result = run_kiln("loadtest", artifacts["sd1"], "--mix", "txt2img=2,images=1")
    assert_user_error(result, "--mix 'images=1': expected NAME=WEIGHT")
