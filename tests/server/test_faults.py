"""Faults that fail one prediction while the worker goes on (broken LoRAs, fetches that fail,
an unexpected exception), a slow webhook receiver that never stalls the queue, a full disk, and
restarts that never run a finished prediction again."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.helpers import LiveServer, box_mask, fast_input, free_port, noise_image, png_bytes
from tests.server.hostile import (MODEL_PATH, Loopback, assert_problem, b64_uri, create, png_header_only, quick_input,
                                   wait_terminal)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, tiny_dir):
    """A server with broken LoRAs in its LoRA folder and short fetch limits, to force faults."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("faulty")
    loras = folder / "loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"\0" * 128)  # not a safetensors file at all
    # Right key names, wrong shapes: the load fails deep inside peft with a RuntimeError.
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 7),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(5, 4)},
              str(loras / "misfit.safetensors"))
    save_file({"unrelated.weight": torch.randn(4, 7)}, str(loras / "nokeys.safetensors"))  # no LoRA keys
    server = LiveServer(folder / "data", args=["--weights", str(tiny_dir), "--lora-dir", str(loras),
                                               "--fetch-timeout-s", "2", "--fetch-max-redirects", "3"]).start()
    yield server
    server.stop()


def fault_cases(origin: Loopback) -> list[tuple[str, dict, str]]:
    """(what, input changes, a phrase the error must contain): each a real fault, none simulated.
    File strings that are not URLs at all (file://, gopher://, a broken host or port) are refused at
    create with 422 (tests/server/replicate/test_api.py); these fail only when the server reads them."""
    picture = png_bytes(noise_image(32, 32))
    closed = free_port()
    return [
        ("LoRA file that is not safetensors", {"lora_weights": "broken"}, "not a readable .safetensors"),
        ("LoRA with the wrong shapes", {"lora_weights": "misfit"}, "misfit.safetensors was made for a model of another size"),
        ("LoRA without LoRA keys", {"lora_weights": "nokeys"}, "nokeys.safetensors holds no FLUX.1 transformer LoRA"),
        ("LoRA name that does not exist", {"lora_weights": "no-such-lora"}, "no LoRA named"),
        ("truncated PNG", {"image": b64_uri(picture[: len(picture) // 2])}, "image"),
        ("bytes that are no image", {"image": b64_uri(b"hello, world", "text/plain")}, "not an image"),
        ("PNG header of 200000x200000 (bomb)", {"image": b64_uri(png_header_only(200_000, 200_000))}, "too many pixels"),
        ("PNG header of 12000x12000", {"mask": b64_uri(png_header_only(12_000, 12_000))}, "100 megapixel limit"),
        ("mask that is no image", {"mask": b64_uri(b"\0" * 300)}, "mask"),
        ("base64 that is not base64", {"image": "data:image/png;base64,@@@@****"}, "image"),
        ("URL answering 404", {"image": origin.url("/missing.png")}, "HTTP 404"),
        ("URL redirecting forever", {"image": origin.url("/loop")}, "more than 3 redirects"),
        ("URL slower than the fetch limit", {"image": origin.url("/slow")}, "took longer than 2 s"),
        ("URL on a closed port", {"image": f"http://127.0.0.1:{closed}/x.png"}, "could not fetch image"),
        ("URL with host 999.999.999.999", {"image": "http://999.999.999.999/x.png"}, "not a URL this server can fetch"),
        ("unknown file id", {"image": "http://127.0.0.1:1/v1/files/" + "a" * 26}, "could not fetch image"),
    ]


def test_each_fault_fails_only_its_prediction_and_the_worker_goes_on(faulty):
    with Loopback(png_bytes(noise_image(32, 32))) as origin:
        cases = fault_cases(origin)
        goods = [fast_input(noise_image(1, 1), box_mask(1, 1, (0, 0, 1, 1)), num_inference_steps=1), quick_input(16),
                 fast_input(noise_image(1, 300), box_mask(1, 300, (0, 0, 1, 100)), num_inference_steps=1)]
        order = []  # a good prediction after every fault, all queued at once
        for i, (what, change, phrase) in enumerate(cases):
            order.append((what, create(faulty.url, {**quick_input(), **change})["id"], phrase))
            order.append(("good", create(faulty.url, goods[i % len(goods)])["id"], None))
        found = wait_terminal(faulty.url, [pid for _, pid, _ in order], timeout=120)
    wrong = []
    for what, pid, phrase in order:
        p = found[pid]
        if phrase is None:
            ok = p["status"] == "succeeded"
        else:
            ok = (p["status"] == "failed" and isinstance(p["error"], str) and phrase in p["error"]
                  and "Internal error" not in p["error"] and p["error"] in p["logs"])
        if not ok:
            wrong.append((what, p["status"], p["error"]))
    assert not wrong, "\n".join(map(str, wrong))
    assert httpx.get(faulty.url + "/health").json()["status"] in ("READY", "BUSY")
    print(f"\nfaults forced: {len(cases)}; each failed its own prediction with a clear error; "
          f"{len(cases)} good predictions between them succeeded")


def test_an_unexpected_exception_fails_one_prediction_and_the_worker_goes_on(faulty):
    """The outputs folder replaced by a file: writing the output raises NotADirectoryError."""
    outputs = faulty.data_dir / "outputs"
    aside = faulty.data_dir / "outputs-aside"
    os.replace(outputs, aside)
    outputs.write_bytes(b"not a folder")
    try:
        p = create(faulty.url, quick_input(), headers={"Prefer": "wait=30"})
    finally:
        outputs.unlink()
        os.replace(aside, outputs)
    assert p["status"] == "failed"
    assert p["error"].startswith("Internal error while generating (") and "server log" in p["error"], p["error"]
    assert "Traceback" not in p["error"] and "Traceback" not in p["logs"]
    assert "Traceback (most recent call last)" in faulty.log()  # the details stay in the server log
    again = create(faulty.url, quick_input(), headers={"Prefer": "wait=30"})
    assert again["status"] == "succeeded", again["error"]


def test_a_slow_webhook_receiver_never_stalls_the_queue(faulty):
    """A receiver that holds each webhook for a minute (past the sender's 10 s per POST): the
    prediction that names it runs as fast as the rest, and the next one starts as soon as it ends.
    Judged on the server's own timestamps, so a loaded machine cannot fail it: a webhook sent in
    the worker's way would add 10 s inside a run or between two."""
    from datetime import datetime

    def at(p: dict, key: str) -> float:
        return datetime.fromisoformat(p[key].replace("Z", "+00:00")).timestamp()

    with Loopback(post_delay_s=60) as receiver:
        t0 = time.monotonic()
        slow = create(faulty.url, quick_input(), webhook=receiver.url("/slow-hook"))
        others = [create(faulty.url, quick_input(seed=i))["id"] for i in range(4)]
        found = wait_terminal(faulty.url, [slow["id"], *others], timeout=45)
        elapsed = time.monotonic() - t0
        assert all(p["status"] == "succeeded" for p in found.values()), {k: v["status"] for k, v in found.items()}
        assert receiver.requests  # the receiver was really being called (and was hanging)
        runs = sorted(found.values(), key=lambda p: at(p, "started_at"))
        assert runs[0]["id"] == slow["id"]
        took = [at(p, "completed_at") - at(p, "started_at") for p in runs]
        gaps = [at(b, "started_at") - at(a, "completed_at") for a, b in zip(runs, runs[1:])]
        assert took[0] < 5 and max(gaps) < 5, (took, gaps)
        # The API answers at once meanwhile.
        t1 = time.monotonic()
        assert httpx.get(faulty.url + "/v1/predictions", timeout=5).status_code == 200
        assert time.monotonic() - t1 < 2
    print(f"\nslow webhook receiver (60 s): 5 predictions done in {elapsed:.1f} s; runs "
          f"{', '.join(f'{t:.2f}' for t in took)} s; gaps between runs at most {max(gaps):.2f} s")


def test_a_full_disk_fails_queued_predictions_cleanly_and_refuses_new_work(server_factory, tmp_path):
    """Predictions queued while there was room fail with a clear error when the disk is full as they
    run (here the server comes back with the disk "full"); new creates and uploads get 507."""
    data = tmp_path / "full"
    server = server_factory(data_dir=data)
    slow = fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)), num_inference_steps=50,
                      megapixels="1", num_outputs=4)
    ids = [create(server.url, slow)["id"]] + [create(server.url, quick_input())["id"] for _ in range(2)]
    server.kill()
    full = server_factory("--min-free-disk-mb", str(10**12), data_dir=data)  # an exabyte: always "full"
    found = wait_terminal(full.url, ids)
    for p in found.values():
        assert p["status"] == "failed"
        assert p["error"] == "The server's disk is full; this prediction could not be saved."
        assert p["output"] is None and p["completed_at"]
    assert_problem(httpx.post(full.url + MODEL_PATH, json={"input": quick_input()}), 507)
    assert_problem(httpx.post(full.url + "/v1/files", files={"content": ("a.png", png_bytes(noise_image(8, 8)))}), 507)
    assert httpx.get(full.url + "/health").json()["status"] == "READY"
    listed = httpx.get(full.url + "/v1/predictions").json()["results"]
    assert {p["id"] for p in listed} == set(ids)
    assert not list((full.data_dir / "outputs").iterdir())  # nothing half-written


def test_the_free_disk_threshold_defaults_to_64_mb():
    from server.settings import Settings

    assert Settings().min_free_disk_mb == 64


def test_a_finished_prediction_never_runs_again_after_a_restart(server_factory, tmp_path):
    data = tmp_path / "restarts"
    server = server_factory(data_dir=data)
    done = [create(server.url, quick_input(seed=i), headers={"Prefer": "wait=30"}) for i in range(2)]
    assert [p["status"] for p in done] == ["succeeded", "succeeded"]
    queued = [create(server.url, quick_input(seed=10 + i))["id"] for i in range(4)]  # some still queued
    files = {p["id"]: next((data / "outputs" / p["id"]).glob("*/out-0.png")) for p in done}  # its run's folder
    stamps = {pid: (f.stat().st_mtime_ns, f.read_bytes()) for pid, f in files.items()}
    keys = ("status", "output", "started_at", "completed_at", "metrics", "logs", "error")

    def check_unchanged(live: LiveServer) -> None:
        for p in done:
            now = httpx.get(f"{live.url}/v1/predictions/{p['id']}").json()
            assert {k: now[k] for k in keys} == {k: p[k] for k in keys}
            assert (files[p["id"]].stat().st_mtime_ns, files[p["id"]].read_bytes()) == stamps[p["id"]]

    server.kill()  # kill -9
    again = server_factory(data_dir=data)
    assert all(p["status"] == "succeeded" for p in wait_terminal(again.url, queued).values())  # the worker ran
    check_unchanged(again)
    assert again.stop() in (0, -15)  # SIGTERM
    third = server_factory(data_dir=data)
    more = create(third.url, quick_input(), headers={"Prefer": "wait=30"})
    assert more["status"] == "succeeded"
    check_unchanged(third)
    assert "runs again" not in "".join(p["logs"] for p in done)
