"""Model folders published to object storage (a real S3-compatible server) and fetched on another disk, byte for byte,
and refused when what arrives is not what was published (issue 53, step 1)."""

from __future__ import annotations

import os

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
                    token="t", weights_dir=tmp_path / "serve", keep_versions=1)
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
        assert client.post("/admin/weights", json={"uri": "s3://arclight/p-v1"}).status_code == 422
        assert client.post("/admin/weights", json={"uri": "s3://arclight/w/p/p-v1"},
                           headers={"Authorization": "Bearer wrong"}).status_code in (401, 403)
