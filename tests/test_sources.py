"""kubeinfer_serving.sources: the one parser of model source URIs (serving catalogue and operator)."""

from __future__ import annotations

import pytest
from kubeinfer_serving.sources import SourceError, parse_source


@pytest.mark.parametrize(
    ("uri", "fields"),
    [
        ("pvc://store/llama/3b", {"scheme": "pvc", "claim": "store", "path": "llama/3b"}),
        ("file:///opt/m", {"scheme": "file", "path": "/opt/m"}),
        ("hf://org/name", {"scheme": "hf", "path": "org/name", "revision": None}),
        ("hf://org/name@v1.2", {"scheme": "hf", "path": "org/name", "revision": "v1.2"}),
        ("hf://org/name@refs/pr/1", {"scheme": "hf", "revision": "refs/pr/1"}),
        ("s3://my-bucket/models/tiny/", {"scheme": "s3", "bucket": "my-bucket", "path": "models/tiny"}),
        ("s3://my-bucket", {"scheme": "s3", "bucket": "my-bucket", "path": ""}),
        ("hf://org/name/q4/m.Q4_1.gguf@v1", {"scheme": "hf", "path": "org/name", "file": "q4/m.Q4_1.gguf",
                                             "revision": "v1"}),
        ("s3://my-bucket/team/m.gguf", {"scheme": "s3", "path": "team/m.gguf", "file": None}),
        ("builtin://tiny-llama", {"scheme": "builtin", "path": "tiny-llama"}),
        ("rel/dir", {"scheme": "path", "path": "rel/dir"}),
    ],
)
def test_valid_sources(uri, fields):
    src = parse_source(uri)
    assert {k: getattr(src, k) for k in fields} == fields
    assert src.remote == (src.scheme in ("hf", "s3"))


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("pvc://store", "pvc://CLAIM/PATH"),
        ("pvc://store/../etc", "'..'"),
        ("pvc://Bad_Claim/x", "PersistentVolumeClaim"),
        ("file://relative", "file:///ABSOLUTE/PATH"),
        ("hf://justname", "hf://ORG/NAME"),
        ("hf://org/name/config.json", "/FILE.gguf"),
        ("hf://org/name/../x.gguf", "/FILE.gguf"),
        ("hf://org/name@", "revision"),
        ("hf://org/name@../x", "revision"),
        ("s3://UPPER/x", "bucket"),
        ("s3://ab/x", "bucket"),
        ("s3://bucket/a/../b", "'..'"),
        ("gs://bucket/x", "must be pvc://"),
        ("", "must be"),
    ],
)
def test_invalid_sources_say_why(uri, fragment):
    with pytest.raises(SourceError, match=fragment if not fragment.startswith("'") else None) as err:
        parse_source(uri)
    assert fragment.strip("'") in str(err.value)


def test_operator_refuses_serving_only_forms():
    for uri in ("builtin://tiny-llama", "/abs/path", "rel"):
        with pytest.raises(SourceError, match="s3://BUCKET/PREFIX"):
            parse_source(uri, allow_local=False)


def test_cache_keys_differ_by_revision_and_are_file_names():
    keys = {parse_source(u).cache_key() for u in ("hf://o/n", "hf://o/n@main", "hf://o/n@v2", "s3://bucket/o/n")}
    assert len(keys) == 3  # no revision means main
    assert all("/" not in k and not k.startswith(".") for k in keys)


def test_one_gguf_file_is_the_remote_file_of_its_snapshot_and_keys_its_own_cache():
    hf, s3 = parse_source("hf://o/n/m.gguf"), parse_source("s3://bucket/team/m.gguf")
    assert (hf.remote_file(), s3.remote_file(), parse_source("hf://o/n").remote_file()) == ("m.gguf", "m.gguf", None)
    assert parse_source("s3://bucket/team").remote_file() is None
    assert hf.cache_key() != parse_source("hf://o/n").cache_key()
