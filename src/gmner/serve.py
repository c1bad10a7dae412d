"""`gmner serve`: a model folder as an HTTP service (FastAPI, run by uvicorn).

- ``POST /predict``: JSON ``{"text": str | "tokens": [str], "image"?: base64 str}``, or a multipart form with a
  ``text`` field and an optional ``image`` file; answers ``{"tokens", "image", "entities": [{"text", "type",
  "start", "end", "char_start", "char_end", "box", "score", "region"}]}`` (gmner.api's fields; ``image``: the
  sha256, width and height read, or null when predicted text-only).
- ``GET /``: a page to type a tweet, pick a picture and see the boxes drawn (plain JS, a canvas, nothing fetched
  from elsewhere). ``GET /health``: ``{"status": "ok", "model", "kind", "grounds"}``.

Every bad request is a 4xx JSON ``{"error": "..."}`` saying what was wrong: a body without Content-Length (411)
or over ``max_request_bytes`` (413), an image over ``max_image_pixels`` (413), a text over ``max_text_chars``,
no words, malformed JSON or base64, or bytes that are not an image (422). One model serves every request, so
predictions run one at a time behind a lock (FastAPI runs the handler in its thread pool): concurrent requests
queue, they never share the model.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gmner.api import Predictor
from gmner.core.images import BadImage, read_image_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 << 20  # a tweet and a photo
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 4000


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(predictor: Predictor, limits: Limits = Limits()) -> FastAPI:
    """The service of ``predictor``; every request goes through ``limits``."""
    app = FastAPI(title=f"gmner: {predictor.path.name}", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # taken in the worker thread: waiting requests never block the event loop
    kind = json.loads((predictor.path / "model.json").read_text()).get("kind")

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "; ".join(e.get("msg", "invalid") for e in exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged here, never sent: no traceback leaves
        log.exception("predict failed")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": str(predictor.path), "kind": kind, "grounds": predictor.grounds}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{model}}", predictor.path.name)

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        tokens, image = await _read_request(request, limits)
        path = info = None
        if image is not None:
            path = predictor.image_path(image)
            info = _image_info(path, limits)

        def one() -> object:
            with lock:  # one prediction at a time: the model and its vision pipeline are not shared
                return predictor.predict([tokens], [path])[0]

        result = await run_in_threadpool(one)
        return {"tokens": list(result.tokens),
                "image": None if result.image_sha256 is None else dict(zip(("sha256", "width", "height"), info)),
                "entities": [asdict(e) for e in result.entities]}

    return app


async def _read_request(request: Request, limits: Limits) -> tuple[list[str], bytes | None]:
    """(words, image bytes or None) of a /predict request, within ``limits``."""
    length = request.headers.get("content-length")
    if length is None:
        raise BadRequest(411, "a Content-Length header is required")
    if not length.isdigit() or int(length) > limits.max_request_bytes:
        raise BadRequest(413, f"request body over {limits.max_request_bytes} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise BadRequest(422, f"body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest(422, "body must be a JSON object")
        text, tokens, image = body.get("text"), body.get("tokens"), body.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise BadRequest(422, '"image" must be a base64 string')
            try:
                image = base64.b64decode(image.split(",", 1)[-1] if image.startswith("data:") else image,
                                         validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(422, '"image" is not valid base64') from None
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=4)
        text, tokens, upload = form.get("text"), None, form.get("image")
        image = None if upload is None or isinstance(upload, str) else await upload.read()
        if isinstance(upload, str) and upload:
            raise BadRequest(422, '"image" must be a file upload')
    else:
        raise BadRequest(415, "send application/json or multipart/form-data (a form)")
    return _words(text, tokens, limits), image or None


def _words(text, tokens, limits: Limits) -> list[str]:
    if (text is None) == (tokens is None):
        raise BadRequest(422, 'give exactly one of "text" and "tokens"')
    if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t.strip() and not any(c.isspace() for c in t)
                                                   for t in tokens):
            raise BadRequest(422, '"tokens" must be a list of words (non-blank strings without spaces)')
        text = " ".join(tokens)
    if not isinstance(text, str):
        raise BadRequest(422, '"text" must be a string')
    if len(text) > limits.max_text_chars:
        raise BadRequest(413, f"text over {limits.max_text_chars} characters")
    words = text.split()
    if not words:
        raise BadRequest(422, "no words to tag")
    return words


def _image_info(path: str, limits: Limits) -> tuple[str, int, int]:
    try:
        info = read_image_info(path)
    except BadImage as exc:
        Path(path).unlink(missing_ok=True)  # stored by content on arrival: keep no unusable bytes
        raise BadRequest(422, f"image unusable ({exc.kind}): {exc.reason}") from None
    if info[1] * info[2] > limits.max_image_pixels:
        raise BadRequest(413, f"image of {info[1]} x {info[2]} pixels, over {limits.max_image_pixels}")
    return info


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(), **load) -> None:
    """Load ``model`` (``load``: gmner.api.load's options) and serve it until interrupted."""
    import uvicorn

    uvicorn.run(create_app(Predictor(model, **load), limits), host=host, port=port, log_level="info")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gmner: {{model}}</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; }
textarea { width: 100%; height: 4rem; font: inherit; }
canvas { max-width: 100%; border: 1px solid #ccc; margin-top: 1rem; }
.error { color: #b00; } li span { font-weight: 600; }
</style></head>
<body>
<h1>gmner: {{model}}</h1>
<form id="form">
  <textarea id="text" placeholder="Type a tweet, e.g. Jordan visits Phoenix">Jordan visits Phoenix</textarea>
  <p><input type="file" id="image" accept="image/*"> <button type="submit">Predict</button></p>
</form>
<p id="status"></p>
<ul id="entities"></ul>
<canvas id="canvas" width="0" height="0"></canvas>
<script>
const colours = {PER: "#d62728", LOC: "#2ca02c", ORG: "#1f77b4", OTHER: "#ff7f0e"};
const status = document.getElementById("status");
function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
function draw(url, entities) {
  const canvas = document.getElementById("canvas"), context = canvas.getContext("2d");
  if (!url) { canvas.width = canvas.height = 0; return; }
  const picture = new Image();
  picture.onload = () => {
    canvas.width = picture.naturalWidth; canvas.height = picture.naturalHeight;
    context.drawImage(picture, 0, 0);
    context.lineWidth = Math.max(2, canvas.width / 200);
    context.font = `${Math.max(12, canvas.width / 40)}px sans-serif`;
    for (const e of entities) {
      if (!e.box) continue;
      const [x1, y1, x2, y2] = e.box, colour = colours[e.type] || "#9467bd";
      context.strokeStyle = context.fillStyle = colour;
      context.strokeRect(x1, y1, x2 - x1, y2 - y1);
      context.fillText(`${e.text} (${e.type})`, x1 + 3, Math.max(y1 - 4, 14));
    }
  };
  picture.src = url;
}
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = document.getElementById("image").files[0];
  const url = file ? await readImage(file) : null;
  status.textContent = "predicting..."; status.className = "";
  const response = await fetch("predict", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({text: document.getElementById("text").value, image: url})});
  const body = await response.json();
  if (!response.ok) { status.textContent = body.error; status.className = "error"; return; }
  status.textContent = `${body.entities.length} entities` + (body.image ? "" : " (text only)");
  const list = document.getElementById("entities");
  list.replaceChildren(...body.entities.map((e) => {
    const item = document.createElement("li"), name = document.createElement("span");
    name.textContent = e.text;
    item.append(name, ` ${e.type}, ` + (e.box ? `box ${e.box.map(Math.round).join(", ")}` : "not in the image"));
    return item;
  }));
  draw(url, body.entities);
});
</script>
</body></html>
"""
