"""`kiln serve` on loopback, driven by the clients people use: webuiapi, openai, httpx.

One server (tiny SD1, tiny BLIP captioner, tiny BLIP ITM) runs for the module, with an API
key, a queue of 2 per model and a 4 MB body limit; a second one checks timeout and SIGTERM.
"""

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import Server

import kiln

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai)")
webuiapi = pytest.importorskip("webuiapi", reason="the serve tests need the dev extra (webuiapi)")

KEY = "test-key-0123"
LONG = {"prompt": "a slow one", "steps": 200, "width": 128, "height": 128, "seed": 1}


@pytest.fixture(scope="module")
def lora_dir(loras, tmp_path_factory):
    """A folder of LoRA files as A1111 keeps them: `<lora:style:0.8>` names style.safetensors."""
    import shutil

    folder = tmp_path_factory.mktemp("loras")
    shutil.copy(loras["sd1"]["a"], folder / "style.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(artifacts, served_blip, lora_dir):
    options = ["--max-queue", "2", "--max-body-mb", "4", "--max-steps", "200", "--timeout", "120"]
    options += ["--lora-dir", lora_dir]
    paths = [artifacts["sd1"], served_blip["blip"], served_blip["blip-itm"]]
    running = Server(paths, *options, key=KEY)
    yield running
    assert running.stop() == 0, running.output()


@pytest.fixture(scope="module")
def a1111(server):
    return webuiapi.WebUIApi(port=server.port, username="any", password=KEY, sampler="Euler a")


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decode(text):
    return Image.open(io.BytesIO(base64.b64decode(text)))


def _photo(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------ A1111


def test_txt2img_through_webuiapi_gives_the_image_kiln_generate_gives(server, a1111, artifacts):
    result = a1111.txt2img(
        prompt="a red cube", steps=3, width=64, height=96, seed=11, cfg_scale=6.0, batch_size=1
    )
    assert len(result.images) == 1 and result.images[0].size == (64, 96)
    assert result.info["seed"] == 11 and result.info["all_seeds"] == [11]
    assert result.info["sampler_name"] == "Euler a"
    local = kiln.load(artifacts["sd1"]).generate(
        "a red cube",
        steps=3,
        width=64,
        height=96,
        seed=11,
        guidance_scale=6.0,
        scheduler="Euler a",
    )
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(local.image))


def test_lora_tags_in_the_prompt_switch_loras_per_request(server, a1111, artifacts, lora_dir):
    settings = {"steps": 3, "width": 64, "height": 64, "seed": 11, "cfg_scale": 6.0}
    tagged = a1111.txt2img(prompt="a red cube <lora:style:0.8>", **settings).images[0]
    plain = a1111.txt2img(prompt="a red cube", **settings).images[0]
    local = {"steps": 3, "width": 64, "height": 64, "seed": 11, "guidance_scale": 6.0}
    with_lora = kiln.load(artifacts["sd1"], loras={str(lora_dir / "style.safetensors"): 0.8})
    want = with_lora.generate("a red cube", scheduler="Euler a", **local).image
    base = kiln.load(artifacts["sd1"]).generate("a red cube", scheduler="Euler a", **local).image
    assert np.array_equal(np.asarray(tagged.convert("RGB")), np.asarray(want))
    assert np.array_equal(np.asarray(plain.convert("RGB")), np.asarray(base))
    assert not np.array_equal(np.asarray(want), np.asarray(base))
    with server.client() as client:
        listed = client.get("/sdapi/v1/loras").json()
        assert [entry["name"] for entry in listed] == ["style"]
        missing = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x <lora:nope:1>", "steps": 1, "width": 64, "height": 64},
        )
    assert missing.status_code == 422 and "no LoRA named 'nope'" in missing.text, missing.text


def test_seed_minus_one_picks_and_reports_a_seed_that_reproduces(a1111):
    first = a1111.txt2img(prompt="x", steps=2, width=64, height=64, seed=-1)
    seed = first.info["seed"]
    assert seed >= 0
    again = a1111.txt2img(prompt="x", steps=2, width=64, height=64, seed=seed)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


def test_batches_seed_each_image(a1111):
    result = a1111.txt2img(prompt="x", steps=2, width=64, height=64, seed=5, batch_size=2, n_iter=2)
    assert len(result.images) == 4 and result.info["all_seeds"] == [5, 6, 7, 8]
    single = a1111.txt2img(prompt="x", steps=2, width=64, height=64, seed=7)
    assert np.array_equal(np.asarray(result.images[2]), np.asarray(single.images[0]))


def test_img2img_and_inpainting_through_webuiapi(a1111):
    init = _photo(64)
    out = a1111.img2img(
        images=[init], prompt="a cube", steps=4, denoising_strength=0.5, width=64, height=64, seed=3
    )
    assert out.images[0].size == (64, 64) and out.info["denoising_strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    painted = a1111.img2img(
        images=[init],
        mask_image=mask,
        prompt="a cube",
        steps=4,
        denoising_strength=0.9,
        width=64,
        height=64,
        seed=3,
    )
    assert painted.images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(painted.images[0]), np.asarray(out.images[0]))


def test_interrogate_gives_the_blip_caption(a1111, served_blip):
    image = _photo(48, seed=2)
    expected = kiln.load(served_blip["blip"]).caption([image]).caption
    assert a1111.interrogate(image).info == expected
    assert a1111.interrogate(image, model="blip").info == expected


def test_models_samplers_and_options(a1111, artifacts):
    names = a1111.util_get_model_names()
    assert names == [artifacts["sd1"].name]
    assert "Euler a" in a1111.util_get_sampler_names()
    assert a1111.get_options()["sd_model_checkpoint"] == names[0]
    assert a1111.set_options({"sd_model_checkpoint": names[0]}) == {}
    refused = a1111.session.post(f"{a1111.baseurl}/options", json={"sd_model_checkpoint": "nope"})
    assert refused.status_code == 422 and "no diffusion model named 'nope'" in refused.text


def test_progress_shows_a_preview_and_interrupt_stops_only_the_callers_job(server, a1111):
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=a1111.txt2img(**LONG)))
    worker.start()
    progress = _wait_for_steps(a1111)
    assert progress["state"]["sampling_steps"] == 200
    assert max(_decode(progress["current_image"]).size) < 128  # latents, not a decoded image
    with server.client(owner="someone-else") as other:
        assert other.post("/sdapi/v1/interrupt").json() == {"interrupted": None}
        assert other.get("/sdapi/v1/progress").json()["state"]["job"] == ""
    assert a1111.get_progress()["progress"] > 0  # still running
    a1111.interrupt()
    worker.join(60)
    assert done["r"].images == [] and done["r"].info["interrupted"] is True


def _wait_for_steps(api, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0 and progress.get("current_image"):
            return progress
        time.sleep(0.05)
    raise AssertionError("no progress")


# ------------------------------------------------------------------------------ OpenAI


def test_openai_images(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    result = client.images.generate(
        prompt="a lighthouse", n=2, size="64x64", response_format="b64_json"
    )
    assert len(result.data) == 2
    assert all(_decode(item.b64_json).size == (64, 64) for item in result.data)
    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.generate(prompt="x", size="100x100")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").images.generate(prompt="x")


# -------------------------------------------------------------------------------- kiln


def test_caption_match_plan_models(server, client, served_blip):
    image = _photo(40, seed=4)
    expected = kiln.load(served_blip["blip"]).caption([image], num_beams=2, max_new_tokens=8)
    answer = client.post(
        "/v1/caption", json={"images": [_png(image)], "num_beams": 2, "max_new_tokens": 8}
    ).json()
    assert answer["captions"] == expected.captions
    local = kiln.load(served_blip["blip-itm"]).match(image, ["a dog", "a cat"])
    matched = client.post("/v1/match", json={"image": _png(image), "texts": ["a dog", "a cat"]})
    assert np.allclose(matched.json()["itm_probabilities"], local.itm_probabilities, atol=1e-5)
    features = kiln.load(served_blip["blip-itm"]).embed(images=[image], texts=["a dog"])
    embedded = client.post("/v1/embed", json={"images": [_png(image)], "texts": ["a dog"]}).json()
    assert np.allclose(embedded["image_features"], features.image_features, atol=1e-5)
    assert np.allclose(embedded["text_features"], features.text_features, atol=1e-5)
    refused = client.post("/v1/embed", json={})
    assert refused.status_code == 422 and "images, texts or both" in refused.text
    answer = client.get("/v1/plan")
    assert answer.json()["replica"]["pid"] == server.process.pid
    assert answer.headers["x-kiln-served-by"].endswith(f":{server.process.pid}")
    assert "replicas" not in answer.json()  # one process: no peers to ask
    plan = answer.json()["models"]
    unet = [c for c in plan["sd1"]["components"] if c["component"] == "unet"][0]
    assert unet["variant"] == "unet/onnx/fp32" and unet["reason"]
    kinds = {m["id"]: m["kind"] for m in client.get("/v1/models").json()["data"]}
    assert kinds == {"sd1": "diffusion", "blip-captions": "captioning", "blip-match": "matching"}


def test_captions_that_arrive_together_are_batched(server):
    """While a slow caption runs, two quick ones with the same options queue and share a call."""
    images = [_png(_photo(32, seed=s)) for s in range(8)]
    answers = {}

    def ask(name, body):
        with server.client(owner=str(name)) as c:
            answers[name] = c.post("/v1/caption", json=body).json()

    long = {"images": images, "num_beams": 10, "max_new_tokens": 60, "min_new_tokens": 59}
    slow = threading.Thread(target=ask, args=("slow", long))
    slow.start()
    with server.client(owner="slow") as watcher:
        while watcher.get("/sdapi/v1/progress").json()["state"]["job"] == "":
            time.sleep(0.005)
    quick = [threading.Thread(target=ask, args=(i, {"images": [images[i]]})) for i in (0, 1)]
    for thread in quick:
        thread.start()
    for thread in [slow, *quick]:
        thread.join()
    assert answers["slow"]["batched_with"] == 0
    assert answers[0]["batched_with"] == answers[1]["batched_with"] == 1
    assert answers[0]["captions"] != answers[1]["captions"]


def test_jobs_belong_to_their_caller(server):
    with server.client() as mine, server.client(owner="intruder") as theirs:
        job = mine.post("/v1/jobs", json={**LONG, "steps": 60}).json()
        assert job["state"] in ("queued", "running")
        assert theirs.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert theirs.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert mine.delete(f"/v1/jobs/{job['id']}").json()["cancelled"] is True
        state = _wait_state(mine, job["id"])
        assert state["state"] == "cancelled"
        finished = mine.post(
            "/v1/jobs", json={"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 9}
        ).json()
        result = _wait_state(mine, finished["id"])
        assert result["state"] == "done" and result["seeds"] == [9]
        assert _decode(result["images"][0]).size == (64, 64)


def _wait_state(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["state"] not in ("queued", "running"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


# ----------------------------------------------------------------------- queue, limits


def test_a_full_queue_answers_429_and_the_queued_jobs_complete(server):
    with server.client() as c:
        running = c.post("/v1/jobs", json={**LONG, "steps": 40}).json()
        queued = [c.post("/v1/jobs", json={**LONG, "steps": 2}).json() for _ in range(2)]
        refused = c.post("/v1/jobs", json={**LONG, "steps": 2})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "queue" in refused.json()["detail"]
        for job in [running, *queued]:
            assert _wait_state(c, job["id"])["state"] == "done"


def test_a_client_that_disconnects_frees_its_slot(server):
    with server.client() as c:
        cancelled_before = _metric(
            c.get("/metrics").text,
            "kiln_jobs_total",
            model="sd1",
            kind="txt2img",
            state="cancelled",
        )
    with server.client(timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/sdapi/v1/txt2img", json=LONG)
    with server.client() as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = c.get("/metrics").text
            if _metric(metrics, "kiln_queue_depth", model="sd1") == 0 and (
                _metric(metrics, "kiln_jobs_total", model="sd1", kind="txt2img", state="cancelled")
                > cancelled_before
            ):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the abandoned job was not stopped")


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 100, "height": 64}, "width: 100"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 999}, "steps"),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "width": 64, "height": 64, "sampler_name": "warp"},
            "sampler_name",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "width": 64, "height": 64, "enable_hr": True},
            "enable_hr",
        ),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, "steps"),
        (
            "/sdapi/v1/img2img",
            {"prompt": "x", "width": 64, "height": 64, "init_images": ["not base64!"]},
            "init_images[0]: not valid base64",
        ),
        (
            "/sdapi/v1/img2img",
            {
                "prompt": "x",
                "width": 64,
                "height": 64,
                "init_images": [base64.b64encode(b"text").decode()],
            },
            "not a readable image",
        ),
        (
            "/sdapi/v1/img2img",
            {
                "prompt": "x",
                "width": 64,
                "height": 64,
                "init_images": [_png(_photo(64))],
                "mask": _png(_photo(32)),
            },
            "mask: 32x32 is not the size",
        ),
        ("/sdapi/v1/interrogate", {"image": _png(Image.new("RGB", (2048, 2048)))}, "pixels"),
        ("/v1/caption", {"images": []}, "images"),
        (
            "/v1/jobs",
            {"prompt": "x", "scheduler": "warp", "width": 64, "height": 64},
            "unknown scheduler",
        ),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(client, path, body, fragment):
    answer = client.post(path, json=body)
    assert 400 <= answer.status_code < 500, answer.text
    assert fragment in answer.json()["detail"]


def test_body_limit_and_api_key(server, client):
    big = client.post("/v1/caption", json={"images": ["A" * (5 * 2**20)]})
    assert big.status_code == 413 and "4 MB" in big.json()["detail"]
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    for path in ("/v1/models", "/sdapi/v1/sd-models", "/metrics", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + "/").status_code == 200  # the page: static, no data
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_metrics_count_what_happened(client):
    client.get("/v1/models")
    text = client.get("/metrics").text
    assert _metric(text, "kiln_requests_total", endpoint="/v1/models", status="200") >= 1
    assert _metric(text, "kiln_jobs_total", model="sd1", kind="txt2img", state="done") >= 1
    assert _metric(text, "kiln_queue_wait_seconds_count", model="sd1") >= 1
    assert _metric(text, "kiln_process_rss_bytes") > 0
    assert _metric(text, "kiln_component_seconds", model="sd1", component="unet_step") > 0


def _metric(text, name, **labels):
    """The value of one sample in Prometheus text, its labels in any order (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if sample == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return 0.0


def test_openapi_describes_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/interrogate",
        "/sdapi/v1/progress",
        "/v1/images/generations",
        "/v1/caption",
        "/v1/match",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/plan",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    schema = paths["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]
    assert schema["schema"]["$ref"].endswith("Txt2ImgRequest")


def test_the_page_is_served_whole(client):
    page = client.get("/").text
    assert "<title>kiln</title>" in page and "/v1/jobs" in page
    assert "http://" not in page and "https://" not in page  # no CDN, nothing fetched elsewhere


# ---------------------------------------------------------------- timeout and SIGTERM


def test_timeout_ends_a_job_and_sigterm_exits_cleanly(artifacts):
    server = Server([artifacts["sd1"]], "--timeout", "2", "--max-steps", "500", "--grace", "20")
    try:
        with server.client() as c:
            slow = c.post("/sdapi/v1/txt2img", json={**LONG, "steps": 500, "width": 256})
            assert slow.status_code == 504 and "timeout of 2 s" in slow.json()["detail"]
            job = c.post("/v1/jobs", json={**LONG, "steps": 60}).json()
            _wait_running(c, job["id"])
            server.process.send_signal(15)
            assert server.process.wait(60) == 0
    finally:
        server.stop()
    log = server.output()
    assert "Traceback" not in log


def _wait_running(client, job_id):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.get(f"/v1/jobs/{job_id}").json()["step"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError("the job did not start")


# ------------------------------------------------------------------------------ load


def test_bounded_load_holds_and_memory_stays_flat(server):
    """A few hundred requests from 16 clients: all end in 200 or 429, RSS within 10%."""
    import asyncio

    headers = {"Authorization": f"Bearer {KEY}"}
    image = _png(_photo(32))

    def rss(c):
        line = next(
            x for x in c.get("/metrics").text.splitlines() if x.startswith("kiln_process_rss_bytes")
        )
        return float(line.split()[-1])

    async def one(c, index):
        started = time.perf_counter()
        if index % 4:
            answer = await c.post("/v1/caption", json={"images": [image]})
        else:
            answer = await c.post(
                "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64}
            )
        return index % 4 != 0, answer.status_code, time.perf_counter() - started

    async def load():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as c:
            gate = asyncio.Semaphore(16)

            async def bounded(index):
                async with gate:
                    return await one(c, index)

            return await asyncio.gather(*(bounded(i) for i in range(240)))

    with server.client() as c:
        before = rss(c)
        started = time.perf_counter()
        results = asyncio.run(load())
        seconds = time.perf_counter() - started
        after = rss(c)
    statuses = {status for _, status, _ in results}
    assert statuses <= {200, 429}, statuses
    assert any(status == 200 for _, status, _ in results)
    assert after <= before * 1.10, (before, after)
    figures = _figures(results, seconds, before, after)
    print("\nload:", json.dumps(figures))


def _figures(results, seconds, before, after):
    out = {
        "seconds": round(seconds, 2),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
    }
    for caption, name in ((True, "caption"), (False, "txt2img")):
        ok = sorted(t for c, s, t in results if c is caption and s == 200)
        if ok:
            out[name] = {
                "ok": len(ok),
                "refused_429": sum(1 for c, s, _ in results if c is caption and s == 429),
                "p50_ms": round(1000 * ok[len(ok) // 2], 1),
                "p99_ms": round(1000 * ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1),
            }
    out["requests_per_second"] = round(len(results) / seconds, 1)
    return out
