"""Model folders published to object storage (a real S3-compatible server) and fetched on another disk, byte for byte,
and refused when what arrives is not what was published (issue 53, step 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_core.common.published import MANIFEST, PublishError, fetch, publish, published_manifest, s3_filesystem


def _adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    return folder


def _same_bytes(a, b) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != MANIFEST) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.parametrize("store", ["s3", "folder"])
def test_a_published_version_arrives_byte_for_byte_on_another_disk(store, tmp_path, request):
    if store == "s3":
        endpoint = request.getfixturevalue("s3")
        uri, options = "s3://arclight/weights/calc/calc-v1", {"AWS_ENDPOINT_URL": endpoint}
    else:
        uri, options = f"file://{tmp_path / 'store'}/calc/calc-v1", None
    trained = _adapter(tmp_path / "trainer" / "calc-v1")
    manifest = publish(trained, uri, options=options)
    assert published_manifest(uri, options=options) == manifest and manifest.bytes > 300_000
    local = fetch(uri, tmp_path / "serve", options=options)
    assert local == tmp_path / "serve" / "calc-v1" and _same_bytes(trained, local)
    assert publish(trained, uri, options=options) == manifest  # again: nothing changes
    # a damaged local copy is fetched again, not used
    (local / "adapter_model.safetensors").write_bytes(b"torn")
    assert _same_bytes(trained, fetch(uri, tmp_path / "serve", options=options))


def test_a_version_whose_bytes_differ_from_its_manifest_is_refused_and_leaves_nothing(s3, tmp_path):
    uri, options = "s3://arclight/weights/calc/calc-v2", {"AWS_ENDPOINT_URL": s3}
    publish(_adapter(tmp_path / "calc-v2"), uri, options=options)
    fs, _ = s3_filesystem(options)
    with fs.open_output_stream("arclight/weights/calc/calc-v2/adapter_model.safetensors") as out:
        out.write(b"not the trained weights")
    with pytest.raises(PublishError, match=r"adapter_model\.safetensors of s3://arclight/weights/calc/calc-v2 does not "
                                           r"match its manifest: sha256 [0-9a-f]{64}, 23 bytes; published"):
        fetch(uri, tmp_path / "serve", options=options)
    assert not [p for p in (tmp_path / "serve").iterdir()]


def test_fetching_what_was_never_published_names_the_uri_and_the_setting(s3, tmp_path):
    with pytest.raises(PublishError, match=r"nothing is published at s3://arclight/weights/x-v9 .*serving\.weights_uri"):
        fetch("s3://arclight/weights/x-v9", tmp_path, options={"AWS_ENDPOINT_URL": s3}, timeout_s=0.5)
    with pytest.raises(PublishError, match="published to s3://bucket/prefix or to a folder"):
        publish(_adapter(tmp_path / "v1"), "gs://bucket/v1")


def test_the_gateway_fetches_a_version_to_its_own_folder_and_answers_why_when_it_cannot(s3, tmp_path, monkeypatch):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.testclient import TestClient

    from lightning_core.serving.app import build_app

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # the gateway's host reads its storage's credentials from AWS_*
    publish(_adapter(tmp_path / "trainer" / "p-v1"), "s3://arclight/w/p/p-v1")
    app = build_app(upstreams=["http://127.0.0.1:9/v1"], base_model="base", exporter=InMemorySpanExporter(),
                    token="t", weights_dir=tmp_path / "serve", keep_versions=1, weights_uri="s3://arclight/w")
    with TestClient(app, headers={"Authorization": "Bearer t"}) as client:
        answer = client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v1"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["path"] == str(tmp_path / "serve" / "p" / "p-v1") and answer.json()["bytes"] > 300_000
        assert _same_bytes(tmp_path / "trainer" / "p-v1", tmp_path / "serve" / "p" / "p-v1")
        publish(_adapter(tmp_path / "trainer" / "q-v1"), "s3://arclight/w/q/q-v1")  # another policy's version
        assert client.post("/admin/weights", json={"uri": "s3://arclight/w/q/q-v1"}).status_code == 200
        for n in (2, 3):  # each policy keeps its keep_versions + 1 newest fetched versions on this disk
            publish(_adapter(tmp_path / "trainer" / f"p-v{n}"), f"s3://arclight/w/p/p-v{n}")
            assert client.post("/admin/weights", json={"uri": f"s3://arclight/w/p/p-v{n}"}).status_code == 200
        assert sorted(p.name for p in (tmp_path / "serve" / "p").iterdir()) == ["p-v2", "p-v3"]
        assert [p.name for p in (tmp_path / "serve" / "q").iterdir()] == ["q-v1"]
        missing = client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v9"})
        assert missing.status_code == 502 and "nothing is published at s3://arclight/w/p/p-v9" in missing.text
        assert client.post("/admin/weights", json={}).status_code == 422
        assert client.post("/admin/weights", json={"uri": "s3://arclight/p-v1"}).status_code == 403  # not under weights_uri
        assert client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v1"},
                           headers={"Authorization": "Bearer wrong"}).status_code in (401, 403)


# --- issue 68, finding 1: a manifest names only files inside the download folder --------------------------------


def _stage(version, keys: list[str], payload: bytes) -> str:
    """A version in a folder store whose manifest lists ``keys``, each with the payload's true size and sha256 (whoever
    writes a manifest writes its hashes too), and the payload where the store's path ``<version>/<key>`` leads."""
    import hashlib
    import json

    version.mkdir(parents=True)
    for key in keys:
        source = Path(os.path.normpath(f"{version}/{key}")) if key.strip("/") else None
        if source is not None and not source.is_dir():
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(payload)
    entry = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (version / MANIFEST).write_text(json.dumps({"files": {key: entry for key in keys}}))
    return f"file://{version}"


def _files(folder) -> set[str]:
    return {str(p) for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("key", ["ABSOLUTE", "../../outside", "a/../../../outside", "a\\..\\outside", "a//b", "./a", ""],
                         ids=["absolute", "dotdot", "dotdot-inside", "backslash", "empty-part", "dot", "empty"])
def test_a_manifest_key_outside_the_download_folder_is_refused_before_anything_is_written(key, tmp_path):
    key = str(tmp_path / "outside" / "written") if key == "ABSOLUTE" else key
    uri = _stage(tmp_path / "store" / "p" / "p-v1", ["adapter_config.json", key], b"from whoever wrote the manifest")
    before = _files(tmp_path)
    with pytest.raises(PublishError, match=r"manifest of file://.*p-v1 names .* a relative path inside the version"):
        fetch(uri, tmp_path / "serve" / "p")
    assert _files(tmp_path) == before  # nothing written, outside the folder or in it
    assert not (tmp_path / "serve" / "p").exists() or not list((tmp_path / "serve" / "p").iterdir())


# --- issue 68, finding 11: a copy fetched before is not read again; two fetches at once keep their own folders -----


def test_a_copy_fetched_before_is_trusted_by_its_sizes_and_times_without_reading_its_bytes(tmp_path):
    uri = f"file://{tmp_path / 'store'}/calc/calc-v1"
    trained = _adapter(tmp_path / "trainer" / "calc-v1")
    publish(trained, uri)
    local = fetch(uri, tmp_path / "serve")
    weights = local / "adapter_model.safetensors"
    seen = weights.stat()
    # other bytes, same size and time: a later fetch (every deploy and restore) does not hash the copy again
    with open(weights, "r+b") as fh:
        fh.write(b"\0" * 16)
    os.utime(weights, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    assert fetch(uri, tmp_path / "serve") == local and weights.read_bytes()[:16] == b"\0" * 16
    # a file whose time or size changed since it was fetched: the copy is fetched again, and holds the trained bytes
    os.utime(weights, ns=(seen.st_atime_ns, seen.st_mtime_ns + 1_000_000_000))
    assert _same_bytes(trained, fetch(uri, tmp_path / "serve"))
    (local / "adapter_config.json").write_text('{"r": 9}')
    assert _same_bytes(trained, fetch(uri, tmp_path / "serve"))
    (local / "tokenizer" / "vocab.json").unlink()
    assert _same_bytes(trained, fetch(uri, tmp_path / "serve"))


def test_two_saves_of_one_folder_at_once_never_delete_each_others_download(tmp_path):
    import threading

    from lightning_core.common.durable import save_atomically

    first_wrote, second_wrote = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def save(who: str, wrote: threading.Event, wait_for: threading.Event | None) -> None:
        def write(tmp):
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "weights").write_text(who * 1000)
            wrote.set()
            if wait_for is not None:
                assert wait_for.wait(10)
        try:
            results[who] = save_atomically(write, root=tmp_path, name="calc-v1", replace=True)
        except BaseException as exc:  # noqa: BLE001 - the test reports what each save raised
            results[who] = exc

    first = threading.Thread(target=save, args=("a", first_wrote, second_wrote))
    first.start()
    assert first_wrote.wait(10)  # the first is inside its download when the second starts
    second = threading.Thread(target=save, args=("b", second_wrote, None))
    second.start()
    first.join(10), second.join(10)
    assert results == {"a": tmp_path / "calc-v1", "b": tmp_path / "calc-v1"}, results
    assert (tmp_path / "calc-v1" / "weights").read_text() in ("a" * 1000, "b" * 1000)
    assert sorted(os.listdir(tmp_path)) == ["calc-v1"]  # no temporary folder left


def _tree(folder) -> set[str]:
    return {str(p) for p in Path(folder).rglob("*")}


def test_the_gateway_fetches_only_versions_under_its_weights_uri_and_deletes_nothing_for_a_refused_one(s3, tmp_path,
                                                                                                        monkeypatch):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.testclient import TestClient

    from lightning_core.serving.app import build_app

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    for uri in ("s3://arclight/w/p/p-v1", "s3://arclight/w/q/q-v1", "s3://arclight/v1", "s3://arclight/w/v1",
                "s3://other/w/p/p-v1"):
        if uri.startswith("s3://other"):
            import boto3

            boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket="other")
        publish(_adapter(tmp_path / "trainer" / uri.replace("/", "_")), uri)
    folder_store = f"file://{tmp_path / 'store'}"
    publish(_adapter(tmp_path / "trainer" / "f-v1"), f"{folder_store}/f/f-v1")
    serve = tmp_path / "serve"

    def gateway(weights_uri):
        app = build_app(upstreams=["http://127.0.0.1:9/v1"], base_model="base", exporter=InMemorySpanExporter(),
                        token="t", weights_dir=serve, keep_versions=0, weights_uri=weights_uri)
        return TestClient(app, headers={"Authorization": "Bearer t"})

    with gateway("s3://arclight/w/") as client:
        assert client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v1"}).status_code == 200
        assert client.post("/admin/weights", json={"uri": "s3://arclight/w/q/q-v1"}).status_code == 200
        fetched = _tree(serve)
        refused = {uri: client.post("/admin/weights", json={"uri": uri}) for uri in [
            "s3://arclight/../v1", "s3://arclight//v1", "s3://arclight/w/../v1", "s3://arclight/w//v1",
            "s3://arclight/w/./v1", "s3://arclight/w/p/p-v1/..", "s3://arclight/w/p", "s3://arclight/w/p/p-v1/x",
            "s3://other/w/p/p-v1", "s3://arclight/wx/p/p-v1", f"{folder_store}/f/f-v1", f"{tmp_path}/store/f/f-v1",
            "s3://arclight/w/p\\..\\x/v1"]}
        assert {uri: r.status_code for uri, r in refused.items()} == {
            "s3://arclight/../v1": 403, "s3://arclight//v1": 403, "s3://arclight/w/../v1": 422,
            "s3://arclight/w//v1": 422, "s3://arclight/w/./v1": 422, "s3://arclight/w/p/p-v1/..": 422,
            "s3://arclight/w/p": 422, "s3://arclight/w/p/p-v1/x": 422, "s3://other/w/p/p-v1": 403,
            "s3://arclight/wx/p/p-v1": 403, f"{folder_store}/f/f-v1": 403, f"{tmp_path}/store/f/f-v1": 403,
            "s3://arclight/w/p\\..\\x/v1": 422}
        assert "serving.weights_uri s3://arclight/w" in refused["s3://arclight/../v1"].text
        assert "policy name '..' is not valid" in refused["s3://arclight/w/../v1"].text
        assert _tree(serve) == fetched  # nothing fetched, nothing pruned
    with gateway(folder_store) as client:  # a folder store: file:// (or its plain path) under it, and nothing else
        assert client.post("/admin/weights", json={"uri": f"{folder_store}/f/f-v1"}).status_code == 200
        assert client.post("/admin/weights", json={"uri": f"{tmp_path}/store/f/f-v1"}).status_code == 200
        assert client.post("/admin/weights", json={"uri": f"{folder_store}/../store/f/f-v1"}).status_code == 422
        assert client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v1"}).status_code == 403
        assert client.post("/admin/weights", json={"uri": f"file://{tmp_path}/trainer/f-v1"}).status_code == 403
        # a manifest in the store itself that names a file outside its version: refused, nothing written
        _stage(tmp_path / "store" / "e" / "e-v1", ["../../outside", "config.json"], b"payload")
        before = _tree(tmp_path)
        evil = client.post("/admin/weights", json={"uri": f"{folder_store}/e/e-v1"})
        assert evil.status_code == 422 and "names '../../outside'" in evil.text and _tree(tmp_path) == before
    with gateway(None) as client:
        missing = client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v1"})
        assert missing.status_code == 409 and "serving.weights_uri" in missing.text
    assert sorted(p.name for p in serve.iterdir()) == ["f", "p", "q"]  # not even a folder for the refused version
