"""Files kept in PostgreSQL (--database postgresql://… without --blob-dir): what one node writes,
another reads, with no folder in common; the copies carry the same time, so the same ETag; Range
works; retention removes the rows; a figure of what it costs."""

from __future__ import annotations

import io
import os
import time
from types import SimpleNamespace

import httpx
import pytest
import replicate

from server.blobs import DatabaseFileStore
from server.postgres import BLOB_PART, PostgresStore
from tests.helpers import box_mask, data_uri, fast_input, noise_image, png_bytes

MODEL = "black-forest-labs/flux-fill-dev"


@pytest.fixture
def open_pg(postgres_url):
    """Opens PostgresStores on the test's database, each closed before the database is dropped."""
    opened = []

    def make():
        opened.append(PostgresStore(postgres_url))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def two_nodes(open_pg, tmp_path):
    a_store, b_store = open_pg(), open_pg()
    return (DatabaseFileStore(tmp_path / "a", a_store, 24), DatabaseFileStore(tmp_path / "b", b_store, 24))


def test_a_file_written_on_one_node_is_read_on_another_in_parts_with_its_time(open_pg, tmp_path):
    a, b = two_nodes(open_pg, tmp_path)
    data = os.urandom(BLOB_PART * 2 + 123)  # three parts
    tmp = a.tmp / "upload"
    tmp.write_bytes(data)
    record = a.save_upload(tmp, "photo.png", "image/png", {"k": 1})
    parts = a.store._all("SELECT part, length(data) AS n FROM blobs WHERE key = ? ORDER BY part", (f"files/{record.id}",))
    assert [(r["part"], r["n"]) for r in parts] == [(0, BLOB_PART), (1, BLOB_PART), (2, 123)]
    assert not (b.uploads / record.id).exists()
    assert b.resolve(f"http://elsewhere/v1/files/{record.id}") == data  # fetched once, kept as a copy
    assert (b.uploads / record.id).stat().st_mtime_ns == (a.uploads / record.id).stat().st_mtime_ns
    names = a.write_outputs("p" * 26, [SimpleNamespace(name="out-0.png", data=b"png" * 1000),
                                       SimpleNamespace(name="out-1.png", data=b"")])  # an empty file too
    assert b.read_output("p" * 26, names[0]) == b"png" * 1000 and b.read_output("p" * 26, names[1]) == b""
    assert b.output_path("p" * 26, "out-2.png") is None
    sizes = a.write_inputs("q" * 26, ["data:text/plain;base64," + "A" * 5000])
    assert b.read_input("q" * 26, 0).endswith("A" * 5000) and sizes == [5023]
    assert b.stored_input_ids() == ["q" * 26] and b.inputs_written_at("q" * 26) > time.time() - 60
    # Removed on one node: its rows go; the other node's janitor removes its copies.
    a.remove_outputs("p" * 26)
    a.delete_upload(record.id)
    assert b.store.blobs_present([f"files/{record.id}", f"outputs/{'p' * 26}/out-0.png"]) == set()
    assert b.read_output("p" * 26, "out-0.png") == b"png" * 1000  # still the copy, until the sweep
    assert b.sweep() == 3  # the upload and two outputs; the input is still kept
    assert b.read_output("p" * 26, "out-0.png") is None and not (b.uploads / record.id).exists()
    assert b.read_input("q" * 26, 0) is not None


def test_a_folder_that_kept_its_files_itself_puts_them_in_the_database_once(open_pg, tmp_path):
    """A server that ran on PostgreSQL with its files in its own folder, restarted with them kept in
    the database: its files are put there (the janitor, which removes copies of files the database
    no longer keeps, must not take them for such copies), once."""
    from server.files import FileStore

    store = open_pg()
    before = FileStore(tmp_path / "a", store, 24)
    tmp = before.tmp / "upload"
    tmp.write_bytes(b"an upload from before")
    record = before.save_upload(tmp, "photo.png", "image/png", {})
    before.write_outputs("p" * 26, [SimpleNamespace(name="out-0.png", data=b"an output from before")])
    assert store.blobs_present([f"files/{record.id}", f"outputs/{'p' * 26}/out-0.png"]) == set()

    a = DatabaseFileStore(tmp_path / "a", store, 24)
    assert a.sweep() == 0 and a.read_output("p" * 26, "out-0.png") == b"an output from before"
    b = DatabaseFileStore(tmp_path / "b", open_pg(), 24)
    assert b.read_output("p" * 26, "out-0.png") == b"an output from before"
    assert b.resolve(f"http://elsewhere/v1/files/{record.id}") == b"an upload from before"
    # Once: removed elsewhere afterwards, the folder's copy goes with the next sweep, not back in.
    b.remove_outputs("p" * 26)
    assert DatabaseFileStore(tmp_path / "a", store, 24).adopt() == 0
    assert a.sweep() == 1 and a.read_output("p" * 26, "out-0.png") is None


def test_files_in_postgresql_cost_little_to_write_and_read(open_pg, tmp_path, capsys):
    """The figure: writing a file to the database, its first read on another node (streamed into that
    node's copy) and the reads after it (the copy), for 1 MB and 64 MB."""
    a, b = two_nodes(open_pg, tmp_path)
    lines = []
    for mb in (1, 64):
        data = os.urandom(mb << 20)
        pid = f"{mb:0>26}"
        t0 = time.perf_counter()
        a.write_outputs(pid, [SimpleNamespace(name="out-0.webp", data=data)])
        t1 = time.perf_counter()
        assert b.read_output(pid, "out-0.webp") == data
        t2 = time.perf_counter()
        assert b.read_output(pid, "out-0.webp") == data
        t3 = time.perf_counter()
        lines.append(f"{mb:>3} MB: write {1000 * (t1 - t0):7.1f} ms, first read on another node "
                     f"{1000 * (t2 - t1):7.1f} ms, cached read {1000 * (t3 - t2):6.1f} ms")
        assert t3 - t2 < t2 - t1
    with capsys.disabled():
        print("\nfiles kept in PostgreSQL:\n" + "\n".join(lines))


def test_nodes_with_no_folder_in_common_share_uploads_inputs_and_outputs(server_factory, postgres_url, tmp_path):
    """Two API nodes and a worker, each with its own --data-dir and no --blob-dir: an upload on one
    node is an input on another, the worker reads it and the long inputs from the database, and its
    outputs are served by both API nodes with the same ETag and Last-Modified, Range included. A
    node with a short retention then removes the rows."""
    pg = ("--database", postgres_url)
    a = server_factory(*pg, "--no-workers", data_dir=tmp_path / "a")
    b = server_factory(*pg, "--no-workers", data_dir=tmp_path / "b")
    server_factory(*pg, data_dir=tmp_path / "w", command="worker")
    img, mask = noise_image(64, 64, seed=7), noise_image(64, 64, seed=8, mode="L")  # a long data: URI
    upload = replicate.Client(base_url=a.url, api_token="unused").files.create(
        io.BytesIO(png_bytes(img)), filename="image.png")
    assert httpx.get(f"{b.url}/v1/files/{upload.id}").json()["checksums"] == upload.checksums
    inp = fast_input(img, mask, num_outputs=2)
    inp["image"] = upload.urls["get"].replace(a.url, b.url)  # node A's upload, asked of node B
    assert len(inp["mask"]) > 4096  # stored apart from the row: in the database
    created = httpx.post(f"{b.url}/v1/models/{MODEL}/predictions", json={"input": inp},
                         headers={"Prefer": "wait=50"}, timeout=60).json()
    assert created["status"] == "succeeded", created
    listed = {n.url: httpx.get(f"{n.url}/v1/predictions").json()["results"][0] for n in (a, b)}
    urls = {node: page["output"] for node, page in listed.items()}
    answers = {node: [httpx.get(u) for u in node_urls] for node, node_urls in urls.items()}
    for i in range(2):
        one, other = answers[a.url][i], answers[b.url][i]
        assert one.status_code == other.status_code == 200 and one.content == other.content
        assert one.content.startswith(b"\x89PNG")
        assert one.headers["etag"] == other.headers["etag"]
        assert one.headers["last-modified"] == other.headers["last-modified"]
    assert list((tmp_path / "a").glob("outputs/*/*/out-*"))  # A's copies, fetched from the database
    ranged = httpx.get(urls[b.url][0], headers={"Range": "bytes=0-7"})
    assert ranged.status_code == 206 and ranged.content == b"\x89PNG\r\n\x1a\n"
    mask_url = listed[a.url]["input"]["mask"]
    assert httpx.get(mask_url.replace(a.url, b.url)).content == png_bytes(mask)  # the long input, from B
    # A node with a short retention: the outputs' and inputs' rows are removed from the database.
    store = a.store()
    try:
        prefix = f"outputs/{created['id']}/"
        assert list(store.blob_folders(f"inputs/{created['id']}/")) == ["0"]  # the mask's data URI
        server_factory(*pg, "--no-workers", "--retention-hours", "0.0001", data_dir=tmp_path / "c")
        deadline = time.monotonic() + 40
        while store.blob_folders(prefix) or store.blob_folders(f"inputs/{created['id']}/"):
            assert time.monotonic() < deadline, "retention did not remove the rows"
            time.sleep(0.5)
        assert httpx.get(f"{a.url}/v1/predictions/{created['id']}").json()["data_removed"] is True
        assert httpx.get(urls[a.url][0]).status_code == 404
    finally:
        store.close()


def test_files_travel_on_a_bounded_number_of_connections(open_pg, tmp_path):
    """Each process opens at most BLOB_CONNECTIONS connections for files: one more waits its turn
    (instead of using up the database's max_connections) and goes on when one is free."""
    import threading

    from server.postgres import BLOB_CONNECTIONS

    store = open_pg()
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    store.put_blob("files/a", path, 1)
    readers = [store.blob_parts("files/a") for _ in range(BLOB_CONNECTIONS)]
    assert all(next(r) == b"x" * 100 for r in readers)  # each holds its connection, mid-read
    done = threading.Event()
    writer = threading.Thread(target=lambda: (store.put_blob("files/b", path, 1), done.set()), daemon=True)
    writer.start()
    assert not done.wait(1.0) and store.blobs_present(["files/b"]) == set()
    readers.pop().close()
    assert done.wait(30) and store.blobs_present(["files/b"]) == {"files/b"}
    for reader in readers:
        reader.close()
