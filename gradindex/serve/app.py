"""The Starlette app of ``gradindex serve``: server-rendered pages over a ``ServeState``.

Routes (every one read-only on the index):

    GET  /                  query form (image, k, methods, label / prompt for conditional models,
                            influence's damping)
    POST /query             top-k training images of each method, side by side
    GET  /train/{row}       a training row's details: norm profile, reach
    GET  /thumb/{row}.png   a training row's thumbnail (row: an integer below len(index))
    GET  /results           results viewer: upload a 'gradindex query --output' .jsonl
    POST /results           upload one
    GET  /results/{token}   page through an uploaded (or --results) file, ?page=N
    GET  /style.css, /drop.js   the pages' own stylesheet and script (no inline script: CSP)

Paths from a request never reach the file system: rows are integers checked against the
index, results live in memory under random tokens. Uploads are bounded (``Limits``); a bad
one is answered with its one-line message on the page.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from gradindex.errors import GradIndexError, first_line
from gradindex.featurize.kfac import DAMPING, check_damping
from gradindex.query import SEARCH_METHODS, AttributionIndex
from gradindex.query_influence import METHOD as INFLUENCE
from gradindex.serve.chart import profile_svg
from gradindex.serve.guard import Admission, HostCheck, SecurityHeaders, read_form
from gradindex.serve.images import png_bytes
from gradindex.serve.limits import Limits
from gradindex.serve.state import ServeState
from gradindex.serve.uploads import UploadError, decode_images
from gradindex.spec import METHODS

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
METHOD_NAMES = {
    "tracin": "Diffusion-TracIn",
    "retrac": "Diffusion-ReTrac",
    "trak": "TRAK",
    "retrak": "ReTrac kernel",
    "influence": "Influence (EK-FAC)",
}
TEMPLATES.env.globals["method_names"] = METHOD_NAMES
NEIGHBOURS = 8  # training rows shown as closest to a training row


def create_app(
    index: AttributionIndex | str | Path,
    data: str | None = None,
    results: str | Path | None = None,
    limits: Limits | None = None,
    hosts: list[str] | None = None,
) -> Starlette:
    """The browser app over ``index`` (an opened index or its folder). ``data``: the training
    images when the build's recorded source moved (same formats as build's --data);
    ``results``: a ``gradindex query --output`` .jsonl to open in the results viewer;
    ``hosts``: the only Host headers answered (None: any; the CLI passes the loopback names
    when it binds to loopback, against DNS rebinding)."""
    if not isinstance(index, AttributionIndex):
        index = AttributionIndex.open(index)
    state = ServeState(index, data=data, limits=limits or Limits())
    start_results = state.load_results_file(results) if results else None
    routes = [
        Route("/", home),
        Route("/query", run_query, methods=["POST"]),
        Route("/train/{row:int}", training_row),
        Route("/thumb/{row:int}.png", thumbnail),
        Route("/results", results_home, methods=["GET", "POST"]),
        Route("/results/{token:str}", results_page),
        Route("/style.css", static_file),
        Route("/drop.js", static_file),
    ]
    handlers = {
        GradIndexError: bad_request,
        HTTPException: http_error,
        Exception: server_error,
    }
    middleware = [Middleware(SecurityHeaders)]
    if hosts:  # a page of another site that resolves its name to loopback is refused
        middleware.insert(0, Middleware(HostCheck, hosts=list(hosts)))
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,  # type: ignore[arg-type]
        middleware=middleware,
    )
    app.state.serve = state
    app.state.admission = Admission(state.limits.max_queries)
    app.state.start_results = start_results
    return app


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def _page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    state = _state(request)
    base = {
        "index": state.index,
        "images": state.images,
        "methods": state.methods,
        "all_methods": list(SEARCH_METHODS),
        # one reason for all kernel methods (they share kernel.h5): the first one found
        "kernel_problem": next((p for p in state.kernel_problems.values() if p), None),
        "influence_problem": state.influence_problem,
        "default_damping": DAMPING,
        "limits": state.limits,
        "conditioning": state.index.conditioning,
        "start_results": request.app.state.start_results,
    }
    return TEMPLATES.TemplateResponse(request, template, {**base, **context}, status_code=status)


# -- pages ----------------------------------------------------------------------------------


async def home(request: Request) -> HTMLResponse:
    state = _state(request)
    return _page(
        request,
        "home.html",
        k=10,
        chosen=state.methods,
        influential=state.most_reached(),
        reach_queries=state.reach_queries,
        reach_k=state.limits.reach_k,
    )


async def run_query(request: Request) -> HTMLResponse:
    with request.app.state.admission.slot():  # 503 past the bound, before the body is read
        return await _run_query(request)


async def _run_query(request: Request) -> HTMLResponse:
    started = time.perf_counter()
    state = _state(request)
    form = await read_form(request, state.limits)
    k = _int_field(form.get("k"), "k", 1, state.limits.max_k)
    chosen = [m for m in form.getlist("method") if isinstance(m, str)]
    bad = [m for m in chosen if m not in state.methods]
    if bad:
        problem = state.problems.get(bad[0])
        why = f": {problem}" if problem else ""
        raise UploadError(f"method {bad[0]!r} is not available for this index{why}")
    if not chosen:
        raise UploadError("choose at least one method")
    damping = _damping_field(form.get("damping"), chosen)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise UploadError("no file was uploaded: pick a PNG or JPEG image, or a .npy of images")
    data = await upload.read()
    channels = state.index.image_shape[0]
    images = await run_in_threadpool(
        decode_images, data, upload.filename or "", channels, state.limits
    )
    label, prompt = _conditioning_fields(form, state)
    out = await run_in_threadpool(state.run_query, images, k, chosen, label, prompt, damping)
    embed_s = sum(out["embed_s"].values())
    name = upload.filename or "upload"
    queries = [
        {
            "query": name if len(images) == 1 else f"{name} [{i}]",
            "png": _data_url(img),
            "cards": {m: out["cards"][m][i] for m in chosen},
        }
        for i, img in enumerate(images)
    ]
    page = _page(
        request,
        "results.html",
        queries=queries,
        chosen=chosen,
        k=k,
        filename=upload.filename,
        timing={
            "embed_ms": 1e3 * embed_s,
            "influence_embed_ms": 1e3 * out["embed_s"].get(INFLUENCE, 0.0),
            "search_ms": {m: 1e3 * s for m, s in out["search_s"].items()},
        },
        resized=out["resized"],
        label=label,
        prompt=prompt,
        damping=(DAMPING if damping is None else damping) if INFLUENCE in chosen else None,
    )
    parts = {"embed": embed_s, **{f"search-{m}": v for m, v in out["search_s"].items()}}
    parts["total"] = time.perf_counter() - started  # the whole request, page rendered
    page.headers["Server-Timing"] = ", ".join(f"{n};dur={1e3 * v:.3f}" for n, v in parts.items())
    return page


async def training_row(request: Request) -> HTMLResponse:
    state = _state(request)
    row = _row(request, state)
    info = await run_in_threadpool(state.details, row)  # off the event loop: reads vectors.h5
    near = await run_in_threadpool(state.neighbours, row, NEIGHBOURS)
    return _page(
        request,
        "train.html",
        row=info,
        chart=profile_svg(info["profile"]),
        neighbours=[{"query": "this row", "cards": near}],
        neighbour_methods=list(METHODS),
        neighbour_k=NEIGHBOURS,
        reach_methods=METHODS,
        reach_queries=state.reach_queries,
        reach_k=state.limits.reach_k,
    )


async def thumbnail(request: Request) -> Response:
    state = _state(request)
    row = _row(request, state)
    if not state.images.available:
        raise HTTPException(404, state.images.problem)
    try:
        png = await run_in_threadpool(state.images.thumbnail, row)  # decodes a file
    except GradIndexError as exc:
        raise HTTPException(404, str(exc)) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


async def results_home(request: Request) -> Response:
    state = _state(request)
    if request.method == "POST":
        with request.app.state.admission.slot():  # uploads share one bound
            token = await _add_results(request, state)
        return RedirectResponse(f"/results/{token}", status_code=303)
    kept = [(t, name, len(entries)) for t, (name, entries) in state.results.items()]
    return _page(request, "results_home.html", kept=kept)


async def _add_results(request: Request, state: ServeState) -> str:
    form = await read_form(request, state.limits)
    upload = form.get("results")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise UploadError("no file was uploaded: pick a .jsonl from 'gradindex query --output'")
    raw = await upload.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError(f"{upload.filename}: not a UTF-8 text file (.jsonl)") from None
    return state.add_results(text, upload.filename)


async def results_page(request: Request) -> HTMLResponse:
    state = _state(request)
    token = request.path_params["token"]
    if token not in state.results:
        raise HTTPException(404, "no such results file (uploads are kept in memory only)")
    name, entries = state.results[token]
    size = state.limits.page_size
    pages = max(1, -(-len(entries) // size))
    page = _int_field(request.query_params.get("page", "1"), "page", 1, pages)
    shown = entries[(page - 1) * size : page * size]
    methods = list(dict.fromkeys(m for e in shown for m in e["methods"]))
    queries = [
        {
            "query": e["query"],
            "cards": {
                m: [state.card(rank, row, score) for rank, row, _id, score in e["methods"][m]]
                for m in methods
                if m in e["methods"]
            },
        }
        for e in shown
    ]
    return _page(
        request,
        "results_file.html",
        name=name,
        token=token,
        page=page,
        pages=pages,
        total=len(entries),
        queries=queries,
        chosen=methods,
    )


STATIC = {"/style.css": ("style.css", "text/css"), "/drop.js": ("drop.js", "text/javascript")}


async def static_file(request: Request) -> Response:
    """The page's own CSS and script (fixed names: nothing from the request)."""
    name, media = STATIC[request.url.path]
    return Response((HERE / "static" / name).read_text(), media_type=media)


# -- helpers --------------------------------------------------------------------------------


def _int_field(value: Any, name: str, lo: int, hi: int) -> int:
    text = str(value).strip() if value is not None else ""
    if not text.lstrip("-").isdigit() or not lo <= int(text) <= hi:
        raise UploadError(f"{name}={text or '(empty)'}: give a whole number from {lo} to {hi}")
    return int(text)


def _damping_field(value: Any, chosen: list[str]) -> float | None:
    """Influence's damping from the form (empty: the library default), checked before the
    embedding; refused when 'influence' is not among the chosen methods, not ignored."""
    text = str(value).strip() if isinstance(value, str) else ""
    if not text:
        return None
    if INFLUENCE not in chosen:
        raise UploadError(
            f"damping={text}: applies to method 'influence' only: tick it, or clear the field"
        )
    return check_damping(text)


def _row(request: Request, state: ServeState) -> int:
    row = int(request.path_params["row"])
    if not state.check_row(row):
        raise HTTPException(
            404, f"no training row {row}: the index has rows 0..{len(state.index) - 1}"
        )
    return row


def _conditioning_fields(form: Any, state: ServeState) -> tuple[Any, Any]:
    """The label (class index) or prompt a conditional index needs; None otherwise."""
    kind = state.index.conditioning["kind"]
    label = str(form.get("label") or "").strip()
    prompt = str(form.get("prompt") or "").strip()
    if kind == "class":
        if not label:
            raise UploadError("this index is class-conditional: give the query's class label")
        return (int(label) if label.lstrip("-").isdigit() else label), None
    if kind == "text":
        if not prompt:
            raise UploadError("this index is text-conditional: give the query's prompt")
        return None, prompt
    return None, None


def _data_url(image: Any) -> str:
    """The query image as it was read (before the model's resizing), inline in the page."""
    png = png_bytes(image, None, side=160)
    return "data:image/png;base64," + base64.b64encode(png).decode()


# -- headers and errors ---------------------------------------------------------------------------------


async def bad_request(request: Request, exc: Exception) -> HTMLResponse:
    return _page(request, "error.html", status=400, message=first_line(exc))


async def http_error(request: Request, exc: Exception) -> HTMLResponse:
    status = getattr(exc, "status_code", 500)
    return HTMLResponse(
        _plain_page(getattr(exc, "detail", "")),
        status_code=status,
        headers=getattr(exc, "headers", None),
    )


async def server_error(request: Request, exc: Exception) -> HTMLResponse:
    logger.exception("gradindex serve: %s %s failed", request.method, request.url.path)
    text = "Something went wrong on the server; the terminal running 'gradindex serve' says what."
    return HTMLResponse(_plain_page(text), status_code=500)


def _plain_page(message: str) -> str:
    from html import escape

    return (
        "<!doctype html><meta charset=utf-8><title>gradindex serve</title>"
        f'<p class="error" id="error">{escape(str(message))}</p><p><a href="/">back</a></p>'
    )
