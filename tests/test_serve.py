"""gmner serve: POST /predict (JSON and multipart), the page, /health, bounded requests, concurrent requests."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from gmner.api import Predictor
from gmner.serve import Limits, create_app


@pytest.fixture(scope="module")
def client(every_word_a_person, tmp_path_factory):
    predictor = Predictor(every_word_a_person, cache=tmp_path_factory.mktemp("cache"))
    return TestClient(create_app(predictor, Limits(max_request_bytes=20_000, max_image_pixels=10_000,
                                                   max_text_chars=200)), raise_server_exceptions=False)


def png(size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and 'fetch("predict"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: nothing fetched elsewhere


def test_predict_json_with_base64_image_and_multipart_upload(client):
    by_json = client.post("/predict", json={"text": "Obama visits", "image": base64.b64encode(png()).decode()})
    assert by_json.status_code == 200
    body = by_json.json()
    assert body["tokens"] == ["Obama", "visits"]
    assert body["entities"][1] == {"text": "visits", "type": "PER", "start": 1, "end": 2, "char_start": 6,
                                   "char_end": 12, "box": None, "score": None, "region": None}
    upload = client.post("/predict", data={"text": "Obama visits"}, files={"image": ("a.png", png(), "image/png")})
    assert upload.status_code == 200 and upload.json()["entities"] == body["entities"]
    data_url = "data:image/png;base64," + base64.b64encode(png()).decode()  # what the page sends
    assert client.post("/predict", json={"tokens": ["Obama"], "image": data_url}).status_code == 200


BAD = [
    ({"json": {"text": "   "}}, 422, "no words"),
    ({"json": {"text": "a", "tokens": ["a"]}}, 422, "exactly one of"),
    ({"json": {"tokens": ["a b"]}}, 422, '"tokens" must be'),
    ({"json": {"text": 5}}, 422, '"text" must be a string'),
    ({"json": [1, 2]}, 422, "JSON object"),
    ({"content": b'{"text": ', "headers": {"content-type": "application/json"}}, 422, "not JSON"),
    ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 422, "not JSON"),
    ({"json": {"text": "a", "image": "%%%"}}, 422, "not valid base64"),
    ({"json": {"text": "a", "image": 7}}, 422, "base64 string"),
    ({"json": {"text": "a", "image": base64.b64encode(b"GIF89a but not").decode()}}, 422, "image unusable"),
    ({"json": {"text": "a", "image": base64.b64encode(png((200, 100))).decode()}}, 413, "pixels, over 10000"),
    ({"json": {"text": "a " * 150}}, 413, "text over 200 characters"),
    ({"content": b"x" * 30_000, "headers": {"content-type": "application/json"}}, 413, "over 20000 bytes"),
    ({"content": b"text=a", "headers": {"content-type": "text/plain"}}, 415, "application/json or multipart"),
    ({"data": {"text": "a", "image": "not a file"}}, 422, "file upload"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, "exactly one"),
    ({"files": [("image", ("a.png", png())), ("image", ("b.png", png()))], "data": {"text": "a"}}, 400, "files"),
]


@pytest.mark.parametrize("request_args, status, message", BAD)
def test_every_bad_request_is_a_4xx_json_error_saying_what(client, request_args, status, message):
    response = client.post("/predict", **request_args)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_unknown_routes_and_methods_are_json_errors(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405


def test_concurrent_requests_are_served_one_at_a_time_without_error(client):
    def one(i: int) -> int:
        return client.post("/predict", json={"text": f"Obama visits Paris {i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(40))) == [200] * 40


def test_the_chunked_request_without_length_is_refused(client):
    response = client.post("/predict", content=iter([json.dumps({"text": "a"}).encode()]),
                           headers={"content-type": "application/json"})
    assert response.status_code == 411
